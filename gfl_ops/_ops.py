"""The registered operators torch.ops.gfl_ops.*: fake kernels and autograd formulas.

The schemas and the device kernels live in C++ (csrc/gfl_ops.cpp, csrc/cpu/, csrc/cuda/).
Every loss operator returns (loss, grad): with reduction "none" the loss of each anchor
(QFL) or row (DFL), with "sum" their sum as a 0-dim tensor (added up inside the operator,
in a fixed order), and, when compute_grad is true, d loss / d pred computed in the same
pass over pred. Since each anchor's loss depends only on its own row of pred, the backward
is that saved gradient scaled by the incoming gradient (per anchor, or one scalar for the
sum): pred is not read again (unless a graph is backpropagated twice, when the gradient is
computed once more). The integral returns (E, dE/dpred) the same way.

That backward is registered in C++ for the native operators (csrc/gfl_ops.cpp: no Python
on a training step's path) and from here, setup_context / backward, for the Triton ones.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import accumulate_dtype

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
    "distribution_focal_loss",
    "distribution_integral",
)


def native_loaded() -> bool:
    return NATIVE_IMPORT_ERROR is None


def _registered_kernels() -> dict:
    """{(operator, device type)} that the compiled library has kernels for: the dispatch table."""
    if not native_loaded():
        return {}
    return {
        (operator, device_type): torch._C._dispatch_has_kernel_for_dispatch_key(
            f"gfl_ops::{operator}", dispatch_key
        )
        for operator in OPERATORS
        for device_type, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
    }


# Read once at import, so that backend selection is plain Python that torch.compile traces.
_REGISTERED_KERNELS = _registered_kernels()


def has_native_kernel(operator: str, device_type: str) -> bool:
    """Whether the compiled library registered a kernel of `operator` for this device type."""
    return _REGISTERED_KERNELS.get((operator, device_type), False)


def operator(name: str, backend: str):
    """The registered operator of a backend: gfl_ops::name (native) or gfl_ops::name_triton."""
    return getattr(torch.ops.gfl_ops, name if backend == "native" else f"{name}_triton")


def anchor_shape(pred: Tensor) -> tuple:
    """pred's shape without the class dimension 1: the shape of the per-anchor loss."""
    return (pred.shape[0],) + tuple(pred.shape[2:])


def grad_buffer(pred: Tensor, compute_grad: bool) -> Tensor:
    """pred's layout when pred is dense (empty_like keeps its strides); empty if unused."""
    return torch.empty_like(pred) if compute_grad else pred.new_empty((0,))


def setup_context(ctx, inputs, output, operator) -> None:
    """Saves the gradient computed in the forward, and the inputs to compute it again."""
    _, grad = output
    ctx.operator = operator
    ctx.has_grad = bool(inputs[-1])  # compute_grad is the last argument of every operator
    ctx.arguments = list(inputs)  # the tensors among them are replaced by the saved ones
    ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    ctx.gradient_consumed = False
    ctx.mark_non_differentiable(grad)
    # No zero-filled pred-sized tensor for the gradient of the `grad` output (never used):
    # unused outputs reach backward as None.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, *[inputs[i] for i in ctx.tensor_positions])
    for i in ctx.tensor_positions:
        ctx.arguments[i] = None


def _recompute_gradient(ctx, tensors) -> Tensor:
    """The operator run again with compute_grad=True on the saved inputs."""
    arguments = list(ctx.arguments)
    for position, tensor in zip(ctx.tensor_positions, tensors):
        arguments[position] = tensor
    arguments[-1] = True
    return ctx.operator(*arguments)[1]


def backward(ctx, grad_loss: Optional[Tensor], _unused: Optional[Tensor]):
    """d total / d pred[n, c, ...] = d total / d loss[n, ...] * d loss[n, ...] / d pred[n, c, ...]."""
    no_input_grads = (None,) * len(ctx.arguments)
    if grad_loss is None:
        return no_input_grads
    if not ctx.has_grad:
        raise RuntimeError(
            "gfl_ops: backward through an operator called with compute_grad=False; "
            "call it with compute_grad=True when pred requires grad"
        )
    grad, *tensor_inputs = ctx.saved_tensors
    # A summed loss: one scalar. Per-anchor losses: each anchor's gradient broadcast over
    # its class (bin) dimension, which is dim 1.
    scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1)
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        # Traced (torch.compile, AOTAutograd): functional form; the compiler reuses the buffer.
        return ((grad * scale).to(grad.dtype),) + no_input_grads[1:]
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gfl_ops: double backward (create_graph=True) is not supported by the fused operators; "
            "use backend='reference' for higher-order gradients"
        )
    if ctx.gradient_consumed:
        # A second backward through the same graph (retain_graph=True, gradcheck, jacobians):
        # the first one scaled the saved buffer in place, so compute the gradient again.
        grad = _recompute_gradient(ctx, tensor_inputs)
    ctx.gradient_consumed = True
    # Eager: scale in place, so the saved buffer becomes pred's gradient and a training step
    # holds one buffer of pred's size, not two. Through .data, so that autograd's version
    # counter is untouched and a second backward can still unpack the saved inputs.
    return (grad.data.mul_(scale),) + no_input_grads[1:]


def check_same_device(pred: Tensor, *others: Optional[Tensor]) -> None:
    """The kernels' device check, for fake kernels (which run without the kernels)."""
    for other in others:
        if other is None:
            continue
        torch._check(
            other.device == pred.device,
            lambda: f"gfl_ops: all tensors must be on pred's device {pred.device}, got one on {other.device}",
        )


def loss_buffer(pred: Tensor, shape: tuple, reduction: str) -> Tensor:
    """The loss output of a loss operator: the per-anchor shape, or 0-dim for "sum"."""
    torch._check(
        reduction in KERNEL_REDUCTIONS,
        lambda: f"gfl_ops: reduction must be one of {KERNEL_REDUCTIONS}, got {reduction!r}",
    )
    return pred.new_empty(shape if reduction == "none" else (), dtype=accumulate_dtype(pred.dtype))


def _fake_quality_focal_loss(pred, label, score, weight, beta, activated, reduction, compute_grad):
    check_same_device(pred, label, score, weight)
    return loss_buffer(pred, anchor_shape(pred), reduction), grad_buffer(pred, compute_grad)


def _fake_quality_focal_loss_dense(pred, target, weight, beta, activated, reduction, compute_grad):
    check_same_device(pred, target, weight)
    return loss_buffer(pred, anchor_shape(pred), reduction), grad_buffer(pred, compute_grad)


def _fake_distribution_focal_loss(pred, target, weight, reduction, compute_grad):
    check_same_device(pred, target, weight)
    return loss_buffer(pred, (pred.shape[0],), reduction), grad_buffer(pred, compute_grad)


def _fake_distribution_integral(pred, compute_grad):
    return pred.new_empty((pred.shape[0],)), grad_buffer(pred, compute_grad)


def register_fake_kernels(namespace: str) -> None:
    """The fake kernels (shapes, dtypes, strides without computing) of the operators
    defined by csrc/gfl_ops.cpp in `namespace`: gfl_ops, or the test suite's second build
    of them (tests/_cuda_emulation.py)."""
    for name, fake in (
        ("quality_focal_loss", _fake_quality_focal_loss),
        ("quality_focal_loss_dense", _fake_quality_focal_loss_dense),
        ("distribution_focal_loss", _fake_distribution_focal_loss),
        ("distribution_integral", _fake_distribution_integral),
    ):
        torch.library.register_fake(f"{namespace}::{name}", fake)


if native_loaded():
    register_fake_kernels("gfl_ops")
    # Autograd of the native operators is registered in C++ (csrc/gfl_ops.cpp), with the
    # formula of setup_context / backward above, which the Triton operators use.
