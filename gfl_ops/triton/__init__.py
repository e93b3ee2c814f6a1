"""The Triton backend: kernels.py (the kernels, same equations as csrc/gfl_math.h) and
ops.py (their launches, the implementations of torch.ops.gfl_ops._<operator>_triton).
Loaded when Triton is importable; the kernels run on CUDA tensors, and on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set before gfl_ops is imported)."""

import os

from .. import _ops

# Triton decides between compiling and interpreting when the kernels are defined.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

try:
    from . import ops

    IMPORT_ERROR = None
except ImportError as error:  # no Triton in this environment
    IMPORT_ERROR = error


# The kernels' schemas and plans come with the compiled library.
if IMPORT_ERROR is None and _ops.native_loaded():
    ops.register(("cuda", "cpu") if INTERPRETER else ("cuda",))


def available(device_type: str) -> bool:
    """Whether the Triton kernels can run on tensors of this device type."""
    if IMPORT_ERROR is not None or not _ops.native_loaded():
        return False
    if device_type == "cpu":
        return INTERPRETER
    return device_type == "cuda"
