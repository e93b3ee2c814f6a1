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

.PHONY: install frameworks test bench verify clean

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

bench: install
	$(PYTHON) -m gfl_ops bench

clean:
	rm -rf build *.egg-info gfl_ops/_C*.so
