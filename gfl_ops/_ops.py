"""The registered operators torch.ops.gfl_ops.*: their fake kernels, and the gradient pass.

The schemas and the one autograd kernel live in C++ (csrc/gfl_registration.cpp,
csrc/gfl_autograd.cpp). Two layers:

    torch.ops.gfl_ops.<operator>(..., backend)   the public operators: the loss (per anchor,
                                                 element or row, or its sum; the integral's value),
                                                 differentiable with respect to pred
    torch.ops.gfl_ops._<operator>_<backend>       their kernels, "native" (csrc/cpu/,
                                                 csrc/cuda/) or "triton" (gfl_ops/triton/):
                                                 (value, d value / d pred) in one pass

The fake kernels registered here (shapes, dtypes and strides without computing; each
operator's fake value is in _registry.py) serve torch.compile and opcheck for both layers.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
from torch import Tensor

from . import _registry

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)

    NATIVE_IMPORT_ERROR = None
except ImportError as error:  # a source checkout that was never built
    NATIVE_IMPORT_ERROR = error

# Every operator (the one list: _registry.py).
OPERATORS = tuple(_registry.OPERATORS)

KERNEL_BACKENDS = ("native", "triton")

# The namespaces built from csrc/gfl_registration.cpp in this process: gfl_ops, and the test suite's
# second build of it (tests/_cuda_emulation.py), each with its own gradient pass setting.
NAMESPACES: List[str] = ["gfl_ops"]


def native_loaded() -> bool:
    return NATIVE_IMPORT_ERROR is None


def _registered_kernels() -> dict:
    """{(operator, device type): whether the compiled library has a native kernel for it}."""
    if not native_loaded():
        return {}
    return {
        (operator, device_type): torch._C._dispatch_has_kernel_for_dispatch_key(
            f"gfl_ops::_{operator}_native", dispatch_key
        )
        for operator in OPERATORS
        for device_type, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
    }


# Read once at import, so that backend selection is plain Python that torch.compile traces.
_REGISTERED_KERNELS = _registered_kernels()


def has_native_kernel(operator: str, device_type: str) -> bool:
    """Whether the compiled library registered a native kernel of `operator` for this device type."""
    return _REGISTERED_KERNELS.get((operator, device_type), False)


def operator(name: str, backend: str):
    """The public operator gfl_ops::name that runs the kernels of `backend`, "native" or
    "triton" (passed to it as its backend argument)."""
    return getattr(torch.ops.gfl_ops, name)


# --------------------------------------------------------------------------------------
# The gradient pass (csrc/gfl_autograd.cpp): where a training step computes pred's gradient.
# --------------------------------------------------------------------------------------


def gradient_pass(device_type: str) -> str:
    """ "forward" (the forward's kernel call writes the gradient, backward scales it) or
    "backward" (backward calls the kernel again, which writes the final gradient), for
    pred on `device_type`; float16 pred always takes "backward"."""
    return torch.ops.gfl_ops._gradient_pass(device_type)


# The device types whose gradient pass was chosen, by set_gradient_pass or by
# GFL_OPS_GRADIENT_PASS at load: the tuning table (_backends.py) does not override them.
GRADIENT_PASS_CHOSEN = {"cpu", "cuda"} if "GFL_OPS_GRADIENT_PASS" in os.environ else set()


def set_gradient_pass(device_type: str, gradient_pass: str) -> None:
    """Sets the gradient pass of `device_type` ("cpu" or "cuda"): "forward" or "backward".
    GFL_OPS_GRADIENT_PASS=forward|backward in the environment sets every device at import."""
    apply_gradient_pass(device_type, gradient_pass)
    GRADIENT_PASS_CHOSEN.add(device_type)


def apply_gradient_pass(device_type: str, gradient_pass: str) -> None:
    """set_gradient_pass without counting as the user's choice (the tuning table's)."""
    for namespace in NAMESPACES:
        getattr(torch.ops, namespace)._set_gradient_pass(device_type, gradient_pass)


# --------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------


def anchor_shape(pred: Tensor) -> tuple:
    """pred's shape without the class dimension 1: the shape of the per-anchor loss."""
    return _registry.anchor_shape(pred)


def _fake_public(operator: _registry.Operator, names: Sequence[str]):
    """The public operator's fake: its value, from its arguments by name."""

    def fake(*arguments):
        return operator.fake_value(dict(zip(names, arguments)))

    return fake


def _fake_kernel(operator: _registry.Operator, names: Sequence[str]):
    """A kernel's fake: (the operator's value, the gradient buffer: pred's layout when pred is
    dense, empty_like keeping its strides; empty without compute_grad)."""

    def fake(*arguments):
        named = dict(zip(names, arguments))
        pred = named["pred"]
        grad = torch.empty_like(pred) if named["compute_grad"] else pred.new_empty((0,))
        return operator.fake_value(named), grad

    return fake


def register_fake_kernels(namespace: str) -> None:
    """The fake kernels of the operators csrc/gfl_registration.cpp defines in `namespace`:
    gfl_ops, or the test suite's second build of them (tests/_cuda_emulation.py)."""
    for operator in _registry.OPERATORS.values():
        names = _registry.argument_names(namespace, operator.name)
        torch.library.register_fake(f"{namespace}::{operator.name}", _fake_public(operator, names))
        for backend in KERNEL_BACKENDS:
            kernel = operator.kernel_name(backend)
            names = _registry.argument_names(namespace, kernel)
            torch.library.register_fake(f"{namespace}::{kernel}", _fake_kernel(operator, names))


if native_loaded():
    register_fake_kernels("gfl_ops")
