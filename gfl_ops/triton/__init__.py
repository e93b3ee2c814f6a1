"""The Triton backend: kernels.py (the kernels, same equations as csrc/gfl_math.h) and
ops.py (torch.ops.gfl_ops.*_triton). Loaded when Triton is importable; the kernels run on
CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""
import os

try:
    from . import ops  # noqa: F401  (registers the operators)

    IMPORT_ERROR = None
except ImportError as error:  # no Triton in this environment
    IMPORT_ERROR = error

# Triton decides between compiling and interpreting when the kernels are defined (above).
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def available(device_type: str) -> bool:
    """Whether the Triton operators can run on tensors of this device type."""
    if IMPORT_ERROR is not None:
        return False
    if device_type == "cpu":
        return INTERPRETER
    return device_type == "cuda"
