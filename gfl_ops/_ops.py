"""The registered operators torch.ops.gfl_ops.*: their fake kernels, and the gradient pass.

The schemas and the one autograd kernel live in C++ (csrc/gfl_ops.cpp). Two layers:

    torch.ops.gfl_ops.<operator>(..., backend)   the public operators: the loss (per anchor,
                                                 element or row, or its sum; the integral's value),
                                                 differentiable with respect to pred
    torch.ops.gfl_ops._<operator>_<backend>       their kernels, "native" (csrc/cpu/,
                                                 csrc/cuda/) or "triton" (gfl_ops/triton/):
                                                 (value, d value / d pred) in one pass

The fake kernels here (shapes, dtypes and strides without computing) serve torch.compile
and opcheck for both layers.
"""

from __future__ import annotations

import os
from typing import List

import torch
from torch import Tensor

from ._reduction import accumulate_dtype

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)

    NATIVE_IMPORT_ERROR = None
except ImportError as error:  # a source checkout that was never built
    NATIVE_IMPORT_ERROR = error

# The reductions the loss operators apply themselves (the mean is their sum divided by the
# anchor count or avg_factor, a scalar operation left to autograd).
KERNEL_REDUCTIONS = ("none", "sum")

OPERATORS = (
    "quality_focal_loss",
    "quality_focal_loss_dense",
    "sigmoid_focal_loss",
    "varifocal_loss",
    "distribution_focal_loss",
    "distribution_integral",
)

KERNEL_BACKENDS = ("native", "triton")

# The namespaces built from csrc/gfl_ops.cpp in this process: gfl_ops, and the test suite's
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
# The gradient pass (csrc/gfl_ops.cpp): where a training step computes pred's gradient.
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
    return (pred.shape[0],) + tuple(pred.shape[2:])


def check_same_device(pred: Tensor, *others) -> None:
    """The kernels' device check, for fake kernels (which run without the kernels)."""
    for other in others:
        if other is None:
            continue
        torch._check(
            other.device == pred.device,
            lambda: f"gfl_ops: all tensors must be on pred's device {pred.device}, got one on {other.device}",
        )


def loss_buffer(pred: Tensor, shape: tuple, reduction: str) -> Tensor:
    """The loss of a per-anchor (per-row) loss operator: that shape, or 0-dim for "sum"."""
    _check_kernel_reduction(reduction)
    return pred.new_empty(shape if reduction == "none" else (), dtype=accumulate_dtype(pred.dtype))


def elementwise_loss_buffer(pred: Tensor, reduction: str) -> Tensor:
    """The loss of an elementwise loss operator (focal, varifocal): pred's shape and layout
    for "none", 0-dim for "sum"."""
    _check_kernel_reduction(reduction)
    dtype = accumulate_dtype(pred.dtype)
    return torch.empty_like(pred, dtype=dtype) if reduction == "none" else pred.new_empty((), dtype=dtype)


def _check_kernel_reduction(reduction: str) -> None:
    torch._check(
        reduction in KERNEL_REDUCTIONS,
        lambda: f"gfl_ops: reduction must be one of {KERNEL_REDUCTIONS}, got {reduction!r}",
    )


def grad_buffer(pred: Tensor, compute_grad: bool) -> Tensor:
    """pred's layout when pred is dense (empty_like keeps its strides); empty if unused."""
    return torch.empty_like(pred) if compute_grad else pred.new_empty((0,))


def _fake_quality_focal_loss(pred, label, score, weight, class_weight, beta, activated, reduction, backend="native"):
    check_same_device(pred, label, score, weight, class_weight)
    return loss_buffer(pred, anchor_shape(pred), reduction)


def _fake_quality_focal_loss_dense(pred, target, weight, class_weight, beta, activated, reduction, backend="native"):
    check_same_device(pred, target, weight, class_weight)
    return loss_buffer(pred, anchor_shape(pred), reduction)


def _fake_sigmoid_focal_loss(pred, target, weight, class_weight, alpha, gamma, activated, reduction, backend="native"):
    check_same_device(pred, target, weight, class_weight)
    return elementwise_loss_buffer(pred, reduction)


def _fake_varifocal_loss(
    pred,
    target,
    score,
    weight,
    class_weight,
    alpha,
    gamma,
    iou_weighted,
    detach_weight,
    activated,
    reduction,
    backend="native",
):
    check_same_device(pred, target, score, weight, class_weight)
    return elementwise_loss_buffer(pred, reduction)


def _fake_distribution_focal_loss(pred, target, weight, reduction, backend="native"):
    check_same_device(pred, target, weight)
    return loss_buffer(pred, (pred.shape[0],), reduction)


def _fake_distribution_integral(pred, backend="native"):
    return pred.new_empty((pred.shape[0],))


_PUBLIC_FAKES = {
    "quality_focal_loss": _fake_quality_focal_loss,
    "quality_focal_loss_dense": _fake_quality_focal_loss_dense,
    "sigmoid_focal_loss": _fake_sigmoid_focal_loss,
    "varifocal_loss": _fake_varifocal_loss,
    "distribution_focal_loss": _fake_distribution_focal_loss,
    "distribution_integral": _fake_distribution_integral,
}


def _fake_kernel(public_fake):
    """A kernel's fake: (the public operator's fake value, the gradient buffer). A loss kernel
    takes the public arguments less `backend`, then compute_grad; the integral's kernel takes
    (pred, grad_scale, compute_grad)."""

    def fake(*arguments):
        value_arguments = arguments[:1] if public_fake is _fake_distribution_integral else arguments[:-1]
        return public_fake(*value_arguments), grad_buffer(arguments[0], arguments[-1])

    return fake


def register_fake_kernels(namespace: str) -> None:
    """The fake kernels of the operators defined by csrc/gfl_ops.cpp in `namespace`: gfl_ops,
    or the test suite's second build of them (tests/_cuda_emulation.py)."""
    for name, fake in _PUBLIC_FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
        for backend in KERNEL_BACKENDS:
            torch.library.register_fake(f"{namespace}::_{name}_{backend}", _fake_kernel(fake))


if native_loaded():
    register_fake_kernels("gfl_ops")
