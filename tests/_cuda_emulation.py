"""The CUDA kernels on a machine without a GPU: csrc/cuda/gfl_kernels.cuh built by the host
compiler and run on CPU tensors under the emulator of the CUDA execution model in
tests/cuda/cuda_emulation/ (blocks, threads, shared memory, barriers, warp shuffles; barrier or
shuffle divergence and misaligned vector accesses raise).

The build links tests/cuda/cuda_emulation/emulated_ops.cpp (the kernels, launched by the operator
bodies of csrc/gfl_operators.h) with csrc/gfl_registration.cpp and csrc/gfl_autograd.cpp compiled
for the namespace gfl_ops_cuda_emulated (gfl_ops's schemas and C++ autograd kernel), and
csrc/gfl_anchor_layout.cpp and csrc/gfl_checks.cpp:
torch.ops.gfl_ops_cuda_emulated.* are gfl_ops's operators with the CUDA kernels in place of
the CPU ones. route_native_operators() sends gfl_ops's backend="native" there, so the
functional API, and every test written for it, drives the CUDA code path end to end.

GFL_CUDA_MAX_BLOCKS=3 caps the grids at three blocks, so that small test inputs exercise
the grid-stride loops and the per-block sums of reduction "sum". GFL_HOST_USES_DEVICE_MATH
makes gfl_math.h take its device branch (expf, log1pf, logf, powf, sqrtf, here libm's, in
place of the host's polynomials): the emulated suite's parity tests, every exponent and
probabilities included, check the formulas that a GPU runs. What they cannot check is
CUDA's own implementations of those functions (within the ulp bounds of the CUDA Math
API, where libm is at least as accurate).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

import gfl_ops

NAMESPACE = "gfl_ops_cuda_emulated"
# Set (to 1) in the environment of a pytest run whose backend="native" is the emulated CUDA
# kernels on CPU tensors (conftest.py routes it; test_cuda_emulation.py starts that run).
ENVIRONMENT_SWITCH = "GFL_OPS_TEST_CUDA_EMULATION"
MAX_BLOCKS = 3

_TESTS = Path(__file__).resolve().parent
_CSRC = _TESTS.parent / "csrc"
_SOURCES = [
    _TESTS / "cuda" / "cuda_emulation" / "emulated_ops.cpp",
    _CSRC / "gfl_registration.cpp",
    _CSRC / "gfl_autograd.cpp",
    _CSRC / "gfl_anchor_layout.cpp",
    _CSRC / "gfl_checks.cpp",
]


def unavailable_reason() -> Optional[str]:
    """Why the emulated kernels cannot be built here, or None."""
    if not gfl_ops._ops.native_loaded():
        return f"gfl_ops's native library is not built: {gfl_ops._ops.NATIVE_IMPORT_ERROR}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) to build the emulated CUDA kernels"
    if not (_CSRC / "cuda" / "gfl_kernels.cuh").exists():
        return "csrc/cuda/gfl_kernels.cuh is not in this checkout"
    return None


@functools.lru_cache(maxsize=None)
def load():
    """torch.ops.gfl_ops_cuda_emulated, built on first use (about 25 s on 2 cores; cached by
    torch.utils.cpp_extension under its build directory until a source changes)."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=NAMESPACE,
        sources=[str(source) for source in _SOURCES],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=[
            "-std=c++20",  # the emulator's fibers and torch's headers
            "-O1",
            "-Wall",
            "-Wno-unknown-pragmas",  # gfl_math.h's `omp simd` hints, for the CPU kernels
            f"-DGFL_CUDA_MAX_BLOCKS={MAX_BLOCKS}",
            f"-DGFL_OPS_NAMESPACE={NAMESPACE}",
            "-DGFL_HOST_USES_DEVICE_MATH",  # gfl_math.h's device branch (see above)
        ],
        is_python_module=False,
    )
    gfl_ops._ops.register_fake_kernels(NAMESPACE)  # for torch.compile and opcheck
    gfl_ops._ops.NAMESPACES.append(NAMESPACE)  # set_gradient_pass sets its gradient pass too
    return getattr(torch.ops, NAMESPACE)


def take_wide_access_count() -> int:
    """16-byte (vector) loads and stores the emulated kernels made since the last call."""
    return load().take_wide_access_count()


def emulated_operator_lookup(backend_operator):
    """gfl_ops._ops.operator with backend="native" sent to the emulated CUDA operators (the
    public operators of that namespace, whose "native" kernels are the emulated ones)."""
    library = load()

    def operator(name: str, backend: str):
        return getattr(library, name) if backend == "native" else backend_operator(name, backend)

    return operator


def route_native_operators() -> None:
    """gfl_ops's backend="native" operators become the emulated CUDA ones, for this process."""
    gfl_ops._ops.operator = emulated_operator_lookup(gfl_ops._ops.operator)
