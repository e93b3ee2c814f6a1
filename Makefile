# Set-up, tests and the benchmark. `make test` and `make bench` each do all the set-up a
# fresh machine with only Python needs.
PYTHON ?= python3
# nvcc's toolkit, when there is one (torch would otherwise guess /usr/local).
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
# One architecture keeps CI's CUDA build short; unset it for the full list (docs/ENVIRONMENT.md).
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider
REQUIRE_CUDA_BUILD = GFL_OPS_REQUIRE_CUDA_BUILD=$(if $(CUDA_HOME),1,0)

.PHONY: install frameworks lint format test test-fast test-emulated test-triton-interpreter test-frameworks \
	test-machine-code test-packaging test-gpu-stack bench verify clean

# --no-build-isolation: the extension is built against the torch installed here.
install:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .

# mmdetection, mmengine, mmcv-lite and ultralytics, for tests/integrations/test_framework_*.py.
frameworks:
	$(PYTHON) -m pip install -q -r requirements-frameworks.txt

# Python by ruff (lint and format), C++ and CUDA by clang-format (.clang-format): checked
# by `make lint` (and `make test`), applied by `make format`.
CXX_SOURCES = $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu \
	tests/cuda/cuda_emulation/*.h tests/cuda/cuda_emulation/*.cpp)
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	clang-format --dry-run --Werror $(CXX_SOURCES)

format:
	$(PYTHON) -m ruff format .
	clang-format -i $(CXX_SOURCES)

# Everything, from a fresh machine: the lint, the suite (the framework tests fail, rather
# than skip, when a framework is missing; so do the CUDA machine-code tests where nvcc is
# here, the build then having the CUDA kernels), then the suite on the emulated CUDA
# kernels, the Triton kernels under Triton's interpreter, and the packaging. What CI runs.
test: install frameworks lint
	GFL_OPS_REQUIRE_FRAMEWORKS=1 $(REQUIRE_CUDA_BUILD) $(PYTEST) -m "not emulated and not packaging" tests
	$(MAKE) test-emulated test-triton-interpreter test-packaging

# The tiers, on what is installed and built already (no set-up):
# the CPU core: parity, reference, errors, opcheck, compile, nn, bench and verify.
test-fast:
	$(PYTEST) -m "not emulated and not machine_code and not frameworks and not packaging" tests

# The CUDA kernels under the CUDA emulator: its self-test and vector-access tests, and the
# suite once more with backend="native" sent to them (CUDA's gradient pass, CPU tensors).
test-emulated:
	GFL_OPS_TEST_CUDA_EMULATION=1 GFL_OPS_GRADIENT_PASS=backward $(PYTEST) \
		-m "not frameworks and not machine_code and not packaging" -k "not cuda" --ignore=tests/triton/test_triton_backend.py tests

# The Triton kernels on CPU tensors under Triton's interpreter.
test-triton-interpreter:
	TRITON_INTERPRET=1 $(PYTEST) -k "triton and cpu" tests/triton/test_triton_backend.py tests/operators/test_numerics.py

test-frameworks: frameworks
	GFL_OPS_REQUIRE_FRAMEWORKS=1 $(PYTEST) -m frameworks tests

test-machine-code:
	$(REQUIRE_CUDA_BUILD) $(PYTEST) -m machine_code tests

# The sdist, a CPU wheel built from it, installed and run outside the tree (about 6 min).
test-packaging:
	$(PYTEST) -m packaging tests

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
	cd $(GPU_STACK)/src && $(REQUIRE_CUDA_BUILD) ../venv/bin/python -m pytest -q -p no:cacheprovider \
		-m "not emulated and not packaging" tests
	cd $(GPU_STACK)/src && TRITON_INTERPRET=1 ../venv/bin/python -m pytest -q -p no:cacheprovider \
		-k "triton and cpu" tests/triton/test_triton_backend.py tests/operators/test_numerics.py

bench: install
	$(PYTHON) -m gfl_ops bench

verify: install
	$(PYTHON) -m gfl_ops verify

clean:
	rm -rf build *.egg-info gfl_ops/_C*.so
