"""The public functions of gfl_ops, in the style of torch.nn.functional.

Each one checks its arguments (a clear error for bad input, before any kernel runs),
resolves the backend and computes the loss with mmdetection's weight/reduction: the
compiled operators apply the weight and the sum themselves, the reference through
weight_reduce_loss. Class (bin) dimension 1, as in F.cross_entropy.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _backends, _ops, reference
from ._reduction import check_reduction, mean_of_sum, weight_reduce_loss

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AvgFactor = Optional[Union[float, Tensor]]

# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _require_tensor(value, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_pred(pred: Tensor, op: str) -> None:
    _require_tensor(pred, "pred")
    if pred.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: pred must be float16, bfloat16, float32 or float64, got {pred.dtype}")


def _check_same_device(pred: Tensor, other: Tensor, name: str, op: str) -> None:
    if other.device != pred.device:
        raise ValueError(f"{op}: {name} is on {other.device} but pred is on {pred.device}")


def _check_class_pred(pred: Tensor, op: str) -> None:
    _check_pred(pred, op)
    if pred.dim() < 2:
        raise ValueError(f"{op}: pred must be (N, C) or (B, C, d1, ..., dk), got shape {tuple(pred.shape)}")
    if pred.shape[1] == 0:
        raise ValueError(f"{op}: pred has no classes (C = 0), shape {tuple(pred.shape)}")


def _check_beta(beta: float, op: str) -> None:
    # Comparisons rather than math.isfinite, which torch.compile(dynamic=True) cannot trace
    # for a float it made symbolic. NaN fails beta >= 0.
    if not (isinstance(beta, (int, float)) and 0 <= beta < math.inf):
        raise ValueError(f"{op}: beta must be a finite number >= 0, got {beta!r}")


def _check_anchor_tensor(pred: Tensor, value: Tensor, name: str, op: str) -> None:
    _require_tensor(value, name)
    _check_same_device(pred, value, name, op)
    expected = (pred.shape[0],) + tuple(pred.shape[2:])
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{op}: {name} must have shape {expected} (pred {tuple(pred.shape)} without its "
            f"class dimension 1), got {tuple(value.shape)}"
        )


def _check_weight(pred: Tensor, weight: Optional[Tensor], loss_shape: tuple, op: str) -> None:
    if weight is None:
        return
    _require_tensor(weight, "weight")
    _check_same_device(pred, weight, "weight", op)
    if tuple(weight.shape) != loss_shape:
        raise ValueError(f"{op}: weight must have the loss's shape {loss_shape}, got {tuple(weight.shape)}")


def _check_avg_factor(pred: Tensor, avg_factor: AvgFactor, op: str) -> None:
    if isinstance(avg_factor, Tensor):
        if avg_factor.numel() != 1:
            raise ValueError(f"{op}: avg_factor must be a number or a 1-element tensor, got shape {tuple(avg_factor.shape)}")
        if avg_factor.device != pred.device and avg_factor.dim() != 0:
            raise ValueError(f"{op}: avg_factor is on {avg_factor.device} but pred is on {pred.device}")


def _check_label_and_score(pred: Tensor, label: Tensor, score: Tensor, op: str) -> None:
    _check_anchor_tensor(pred, label, "label", op)
    _check_anchor_tensor(pred, score, "score", op)
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise TypeError(f"{op}: label must be an integer tensor of class indices, got {label.dtype}")
    if not score.dtype.is_floating_point:
        raise TypeError(f"{op}: score must be a floating-point tensor (the IoU target), got {score.dtype}")


def _check_bins(pred: Tensor, op: str) -> None:
    _check_pred(pred, op)
    if pred.dim() != 2:
        raise ValueError(f"{op}: pred must be (M, n + 1) logits over bins 0..n, got shape {tuple(pred.shape)}")
    if pred.shape[1] < 2:
        raise ValueError(f"{op}: pred needs at least 2 bins, got shape {tuple(pred.shape)}")


def _validate_dfl_target_range(target: Tensor, last_bin: int) -> None:
    """target in [0, n] (NaN is out of range). Reads the target's extremes on the host: a sync."""
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    lowest, highest = (float(v) for v in torch.aminmax(target.detach()))  # NaN propagates into both
    if not (lowest >= 0 and highest <= last_bin):
        bad = target.detach()[~((target >= 0) & (target <= last_bin))]
        raise ValueError(
            f"distribution_focal_loss: target must lie in [0, {last_bin}] (n + 1 = {last_bin + 1} "
            f"bins; target == {last_bin} is valid), got {bad.numel()} value(s) outside, e.g. "
            f"{bad[:4].tolist()}; clamp it (mmdetection uses reg_max - 0.1) or pass validate=False "
            f"to clamp inside the kernel"
        )


def _check_constant_targets(backend: str, op: str, **targets: Tensor) -> None:
    """The kernels differentiate with respect to pred only: targets (IoU scores, soft targets,
    box distances) are constants in GFL. Say so rather than return a wrong None gradient."""
    if backend == "reference" or not torch.is_grad_enabled():
        return
    for name, value in targets.items():
        if value.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but backend {backend!r} computes gradients with respect "
                f"to pred only; pass {name}.detach() (targets are constants in GFL) or backend='reference'"
            )


def _accumulate_dtype(pred: Tensor) -> torch.dtype:
    return reference.accumulate_dtype(pred.dtype)


# --------------------------------------------------------------------------------------
# Weight and reduction: inside the operators where they can, else as mmdetection does
# --------------------------------------------------------------------------------------


def _kernel_weight(pred: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    """The weight the kernels apply themselves (to the loss and to its gradient, in the same
    pass): a constant one. A weight that requires grad is applied afterwards by autograd."""
    if weight is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    return weight.to(_accumulate_dtype(pred))


def _dense_target_for_kernel(pred: Tensor, target: Tensor) -> Tensor:
    """The kernels read a dense target in pred's dtype or in float32 (float64 for float64
    pred) as it is: AMP's float32 targets of bfloat16 logits need no N x C copy. Other
    dtypes are converted to float32 (float64)."""
    if target.dtype in (pred.dtype, _accumulate_dtype(pred)):
        return target
    return target.to(_accumulate_dtype(pred))


def _reduced_loss(operator_loss, reference_loss, pred: Tensor, weight: Optional[Tensor], backend: str,
                  reduction: str, avg_factor: AvgFactor, count: int) -> Tensor:
    """The weighted, reduced loss of `count` anchors (rows).

    operator_loss(kernel_weight, kernel_reduction): the backend operator's loss, which
    applies a constant weight and the sum itself; reference_loss(): the reference's
    per-anchor losses, which weight_reduce_loss weights and reduces, as it does a weight
    that requires grad.
    """
    if backend == "reference":
        return weight_reduce_loss(reference_loss(), weight, reduction, avg_factor)
    kernel_weight = _kernel_weight(pred, weight)
    if weight is not None and kernel_weight is None:
        return weight_reduce_loss(operator_loss(None, "none"), weight, reduction, avg_factor)
    if reduction == "none":
        return operator_loss(kernel_weight, "none")
    total = operator_loss(kernel_weight, "sum")
    return total if reduction == "sum" else mean_of_sum(total, count, avg_factor)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def quality_focal_loss(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Quality Focal Loss with (label, score) targets (mmdetection 3.x semantics).

    Args:
        pred: logits (N, C) or (B, C, d1, ..., dk) (probabilities if activated=True), any
            strides: a (B, C, H, W) head output is read in place.
        label: integer class per anchor, shape (N) or (B, d1, ..., dk); a value in [0, C)
            marks a positive of that class, any other (C, -1, ...) is background.
        score: float IoU target of the positive class, label's shape.
        beta: the exponent of the modulating factor |y - sigma|^beta, >= 0.
        weight: per-anchor weight, label's shape.
        reduction: "none" (per-anchor loss, label's shape), "mean" or "sum".
        avg_factor: with "mean", the loss sum is divided by avg_factor + eps (a float or a
            tensor, never synced to the host).
        activated: pred holds probabilities, not logits.
        backend: "auto", "native", "triton" or "reference".

    The loss is float32 for float16/bfloat16 pred (float64 for float64); the gradient has
    pred's dtype and layout.
    """
    op = "quality_focal_loss"
    _check_class_pred(pred, op)
    _check_label_and_score(pred, label, score, op)
    _check_beta(beta, op)
    check_reduction(reduction, avg_factor)
    _check_weight(pred, weight, tuple(label.shape), op)
    _check_avg_factor(pred, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op)
    _check_constant_targets(chosen, op, score=score)
    return _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred, label.long(), score.to(_accumulate_dtype(pred)), kernel_weight, float(beta), activated,
            kernel_reduction, chosen,
        ),
        lambda: reference.quality_focal_loss_per_anchor(pred, label, score, beta, activated),
        pred, weight, chosen, reduction, avg_factor, label.numel(),
    )


def quality_focal_loss_dense(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Quality Focal Loss against a dense soft target of pred's shape.

    mmdetection's quality_focal_loss_tensor_target; with beta=0 it is the soft-target BCE of
    YOLOv8 (summed over classes per anchor). The target is used at its own precision (in
    float32 maths, as the reference does): a float32 target of half logits is read as it is,
    not rounded to pred's dtype and not copied.
    """
    op = "quality_focal_loss_dense"
    _check_class_pred(pred, op)
    _require_tensor(target, "target")
    _check_same_device(pred, target, "target", op)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{op}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if not target.dtype.is_floating_point:
        raise TypeError(f"{op}: target must be a floating-point tensor, got {target.dtype}")
    _check_beta(beta, op)
    check_reduction(reduction, avg_factor)
    _check_weight(pred, weight, (pred.shape[0],) + tuple(pred.shape[2:]), op)
    _check_avg_factor(pred, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op)
    _check_constant_targets(chosen, op, target=target)
    return _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred, _dense_target_for_kernel(pred, target), kernel_weight, float(beta), activated, kernel_reduction,
            chosen,
        ),
        lambda: reference.quality_focal_loss_dense_per_anchor(pred, target, beta, activated),
        pred, weight, chosen, reduction, avg_factor, pred.numel() // pred.shape[1],
    )


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Distribution Focal Loss: cross-entropy on the two bins around a continuous target.

    Args:
        pred: (M, n + 1) logits over bins 0..n (GFL: reg_max + 1 = 17 bins).
        target: float (M) in [0, n]; target == n is valid.
        validate: check the range on the host (a sync) and raise ValueError; with
            validate=False the kernel clamps the target into [0, n] instead (NaN -> 0).
    """
    op = "distribution_focal_loss"
    _check_bins(pred, op)
    _require_tensor(target, "target")
    _check_same_device(pred, target, "target", op)
    if tuple(target.shape) != (pred.shape[0],):
        raise ValueError(f"{op}: target must have shape ({pred.shape[0]},), got {tuple(target.shape)}")
    if not target.dtype.is_floating_point:
        raise TypeError(f"{op}: target must be a floating-point tensor, got {target.dtype}")
    check_reduction(reduction, avg_factor)
    _check_weight(pred, weight, (pred.shape[0],), op)
    _check_avg_factor(pred, avg_factor, op)
    if validate:
        _validate_dfl_target_range(target, pred.shape[1] - 1)
    chosen = _backends.resolve_backend(backend, pred.device, op)
    _check_constant_targets(chosen, op, target=target)
    return _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred, target.to(_accumulate_dtype(pred)), kernel_weight, kernel_reduction, chosen,
        ),
        lambda: reference.distribution_focal_loss_per_row(pred, target),
        pred, weight, chosen, reduction, avg_factor, pred.shape[0],
    )


def distribution_integral(pred: Tensor, *, backend: str = "auto") -> Tensor:
    """E = sum_k softmax(pred)_k * k over the last dimension (GFL's Integral), differentiable.

    pred: (..., n + 1) logits over bins 0..n; returns (...) in pred's dtype.
    """
    op = "distribution_integral"
    _check_pred(pred, op)
    if pred.dim() < 1 or pred.shape[-1] < 2:
        raise ValueError(f"{op}: the last dimension of pred must hold at least 2 bins, got shape {tuple(pred.shape)}")
    chosen = _backends.resolve_backend(backend, pred.device, op)
    if chosen == "reference":
        return reference.distribution_integral(pred)
    # (M, n + 1) is read through its strides; other shapes become rows of bins (a view
    # when the leading dimensions merge, a copy otherwise).
    rows = pred if pred.dim() == 2 else pred.reshape(-1, pred.shape[-1])
    return _ops.operator(op, chosen)(rows, chosen).view(pred.shape[:-1])
