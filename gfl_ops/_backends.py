"""Backend selection, in one place.

"native"    the compiled C++ (CPU) and CUDA kernels, torch.ops.gfl_ops.*
"triton"    the Triton kernels (GPU)
"reference" plain PyTorch (gfl_ops.reference)
"auto"      the fastest backend available for the device of the inputs

"auto" runs what the tuning table (gfl_ops/_tuning.py, written by `python -m gfl_ops tune`)
measured as faster for the CUDA device, the operator and pred's dtype, where the table has
that entry and the backend is available; otherwise the first available of native, triton,
reference. Without a table that fixed order is the whole rule.

The table may also hold the device's faster gradient pass. The first time "auto" resolves
on a CUDA device whose entry has one, it is set with _ops.set_gradient_pass("cuda", ...),
once, unless the pass was chosen (GFL_OPS_GRADIENT_PASS in the environment, or
set_gradient_pass). The gradient pass is one setting per device type, so on a machine with
different GPUs the first one seen sets it. A call traced by torch.compile leaves it to the
first call outside of tracing.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from . import _ops, _tuning
from . import triton as _triton

BACKENDS = ("native", "triton", "reference")
# Preference of "auto", fastest first, where the tuning table does not say.
_AUTO_ORDER = ("native", "triton", "reference")
_tuned_gradient_pass_applied = False


def _device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def available_backends(
    device: Union[str, torch.device, None] = "cpu", operator: str = "quality_focal_loss"
) -> List[str]:
    """The backends that can serve `operator` on `device`, fastest first."""
    device_type = _device_type(device)
    available = []
    for backend in _AUTO_ORDER:
        if backend == "native" and _ops.has_native_kernel(operator, device_type):
            available.append(backend)
        elif backend == "triton" and _triton.available(device_type):
            available.append(backend)
        elif backend == "reference":
            available.append(backend)
    return available


def _apply_tuned_gradient_pass(device: torch.device) -> None:
    """Sets CUDA's gradient pass from the tuning table, once (see the module's docstring)."""
    global _tuned_gradient_pass_applied
    if _tuned_gradient_pass_applied or "cuda" in _ops.GRADIENT_PASS_CHOSEN or torch.compiler.is_compiling():
        return
    gradient_pass = _tuning.tuned_gradient_pass(device)
    if gradient_pass is not None:
        _ops.apply_gradient_pass("cuda", gradient_pass)
        _tuned_gradient_pass_applied = True


def _auto_backend(device: torch.device, operator: str, dtype: Optional[torch.dtype], available: List[str]) -> str:
    _apply_tuned_gradient_pass(device)
    tuned = None if dtype is None else _tuning.tuned_backend(device, operator, dtype)
    return tuned if tuned in available else available[0]


def resolve_backend(
    backend: str,
    device: Union[str, torch.device, None],
    operator: str = "quality_focal_loss",
    dtype: Optional[torch.dtype] = None,
) -> str:
    """The backend that will run: `backend` itself if it can; for "auto", the tuned one for
    `operator` on pred of `dtype` on `device` where the tuning table has it and it is
    available, else the first available.

    An explicit backend that cannot serve the device raises a ValueError naming why.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    available = available_backends(device, operator)
    if backend == "auto":
        return _auto_backend(torch.device("cpu" if device is None else device), operator, dtype, available)
    if backend not in available:
        reason = ""
        if backend == "native" and not _ops.native_loaded():
            reason = f": the compiled extension gfl_ops._C did not load ({_ops.NATIVE_IMPORT_ERROR})"
        elif backend == "native":
            reason = ": gfl_ops._C was built without kernels for this device"
        elif backend == "triton" and _triton.IMPORT_ERROR is not None:
            reason = f": Triton did not import ({_triton.IMPORT_ERROR})"
        elif backend == "triton" and not _ops.native_loaded():
            reason = (
                ": the compiled extension gfl_ops._C, which the Triton kernels share, did not load "
                f"({_ops.NATIVE_IMPORT_ERROR})"
            )
        elif backend == "triton":
            reason = ": Triton kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1)"
        raise ValueError(
            f"backend {backend!r} is not available for {operator} on device type "
            f"{_device_type(device)!r}{reason}; available: {available}"
        )
    return backend
