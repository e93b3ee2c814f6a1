# Set-up, tests and the benchmark. `make test` and `make bench` each do all the set-up a
# fresh machine with only Python needs.
PYTHON ?= python3
# nvcc's toolkit, when there is one (torch would otherwise guess /usr/local).
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
# One architecture keeps CI's CUDA build short; unset it for the full list (see README).
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

# mmcv 2.1.0 (what mmdetection 3.3.0 accepts) from its sdist, pinned by hash, built in about
# 10 s without its compiled ops; the tests stand in for mmcv.ops (gfl_ops/bench/mmcv_ops_standin.py).
MMCV_SDIST = https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz\#sha256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f

.PHONY: install frameworks test test-gpu-stack bench verify clean

# --use-pep517: with the setuptools<81 that `make frameworks` installs, pip would otherwise
# redo the editable install through `setup.py develop`, which runs pip again with build
# isolation, where torch is missing: a second `make test` in one environment failed.
install:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation --use-pep517 -e .

# mmdetection, mmengine, mmcv and ultralytics, for tests/test_framework_*.py.
frameworks:
	$(PYTHON) -m pip install -q -r requirements-frameworks.txt
	MMCV_WITH_OPS=0 $(PYTHON) -m pip install -q --no-build-isolation --no-deps "mmcv-lite @ $(MMCV_SDIST)"

# The framework tests fail, rather than skip, when a framework is missing here; so do the
# CUDA machine-code tests where nvcc is here (the build then has the CUDA kernels).
test: install frameworks
	GFL_OPS_REQUIRE_FRAMEWORKS=1 GFL_OPS_REQUIRE_CUDA_BUILD=$(if $(CUDA_HOME),1,0) $(PYTHON) -m pytest -q tests

# The GPU machine's stack without a GPU (requirements-gpu-stack.txt: torch 2.11.0, Triton
# 3.6.0): its own environment and a copy of the sources under $(GPU_STACK), so the main
# build is left alone; the extension built against that torch (with the CUDA kernels where
# nvcc is here), then the suite but the frameworks and the CUDA emulator: the CPU kernels,
# the Triton interpreter cases and the Triton compiler's machine-code tests. Not part of
# `make test` (it adds a second install and build): see CONTRIBUTING.md.
GPU_STACK ?= build/gpu-stack
test-gpu-stack:
	rm -rf $(GPU_STACK)/src && mkdir -p $(GPU_STACK)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(GPU_STACK)/src
	[ -x $(GPU_STACK)/venv/bin/python ] || $(PYTHON) -m venv $(GPU_STACK)/venv
	$(GPU_STACK)/venv/bin/python -m pip install -q -r requirements-gpu-stack.txt
	cd $(GPU_STACK)/src && ../venv/bin/python setup.py -q build_ext --inplace
	$(GPU_STACK)/venv/bin/python -c "import sys, torch, triton, numpy, pytest, hypothesis as h; \
		print('Python', sys.version.split()[0], 'torch', torch.__version__, 'Triton', triton.__version__, \
		'numpy', numpy.__version__, 'pytest', pytest.__version__, 'hypothesis', h.__version__)"
	cd $(GPU_STACK)/src && GFL_OPS_REQUIRE_CUDA_BUILD=$(if $(CUDA_HOME),1,0) ../venv/bin/python -m pytest -q \
		-p no:cacheprovider tests --ignore=tests/test_cuda_emulation.py

bench: install
	$(PYTHON) -m gfl_ops bench

clean:
	rm -rf build *.egg-info gfl_ops/_C*.so
