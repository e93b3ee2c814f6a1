"""Backend selection, in one place.

"native"    the compiled C++ (CPU) and CUDA kernels, torch.ops.gfl_ops.*
"triton"    the Triton kernels (GPU)
"reference" plain PyTorch (gfl_ops.reference)
"auto"      the fastest backend available for the device of the inputs
"""
from __future__ import annotations

from typing import List, Union

import torch

from . import _ops
from . import triton as _triton

BACKENDS = ("native", "triton", "reference")
# Preference of "auto", fastest first.
_AUTO_ORDER = ("native", "triton", "reference")


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


def resolve_backend(
    backend: str, device: Union[str, torch.device, None], operator: str = "quality_focal_loss"
) -> str:
    """The backend that will run: `backend` itself if it can, the first available for "auto".

    An explicit backend that cannot serve the device raises a ValueError naming why.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    available = available_backends(device, operator)
    if backend == "auto":
        return available[0]
    if backend not in available:
        reason = ""
        if backend == "native" and not _ops.native_loaded():
            reason = f": the compiled extension gfl_ops._C did not load ({_ops.NATIVE_IMPORT_ERROR})"
        elif backend == "native":
            reason = ": gfl_ops._C was built without kernels for this device"
        elif backend == "triton" and _triton.IMPORT_ERROR is not None:
            reason = f": Triton did not import ({_triton.IMPORT_ERROR})"
        elif backend == "triton" and not _ops.native_loaded():
            reason = f": the compiled extension gfl_ops._C, which the Triton kernels share, did not load ({_ops.NATIVE_IMPORT_ERROR})"
        elif backend == "triton":
            reason = ": Triton kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1)"
        raise ValueError(
            f"backend {backend!r} is not available for {operator} on device type "
            f"{_device_type(device)!r}{reason}; available: {available}"
        )
    return backend
