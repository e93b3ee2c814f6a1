# Set-up, tests and the benchmark. `make test` and `make bench` each do all the set-up a
# fresh machine with only Python needs.
PYTHON ?= python3
# nvcc's toolkit, when there is one (torch would otherwise guess /usr/local).
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
# One architecture keeps CI's CUDA build short; unset it for the full list (see README).
TORCH_CUDA_ARCH_LIST ?= 9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST

.PHONY: install test bench verify clean

install:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m gfl_ops bench

clean:
	rm -rf build *.egg-info gfl_ops/_C*.so
