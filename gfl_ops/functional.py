"""The public functions of gfl_ops, in the style of torch.nn.functional.

Each one checks its arguments (a clear error for bad input, before any kernel runs),
resolves the backend and computes the loss with mmdetection's weight/reduction: the
compiled operators apply the weight and the sum themselves, the reference through
weight_reduce_loss. Class (bin) dimension 1, as in F.cross_entropy.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _backends, _checks, _ops, reference
from ._checks import AvgFactor
from ._ops import gradient_pass, set_gradient_pass  # noqa: F401  (part of this module's API)
from ._reduction import accumulate_dtype, check_reduction, elementwise_weight, mean_of_sum, weight_reduce_loss


def _accumulate_dtype(pred: Tensor) -> torch.dtype:
    return accumulate_dtype(pred.dtype)


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


def _reduced_loss(
    operator_loss,
    reference_loss,
    pred: Tensor,
    weight: Optional[Tensor],
    backend: str,
    reduction: str,
    avg_factor: AvgFactor,
    count: int,
) -> Tensor:
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


def _check_reduction_arguments(
    pred: Tensor, weight: Optional[Tensor], loss_shape: tuple, reduction: str, avg_factor: AvgFactor, op: str
) -> None:
    check_reduction(reduction, avg_factor)
    _checks.check_weight(pred, weight, loss_shape, op)
    _checks.check_avg_factor(pred, avg_factor, op)


def _kernel_class_weight(pred: Tensor, class_weight: Optional[Tensor]) -> Optional[Tensor]:
    return None if class_weight is None else class_weight.to(_accumulate_dtype(pred))


def _reduced_elementwise_loss(
    operator_loss,
    reference_loss,
    pred: Tensor,
    weight: Optional[Tensor],
    backend: str,
    reduction: str,
    avg_factor: AvgFactor,
) -> Tensor:
    """_reduced_loss for the elementwise losses (focal, varifocal): a loss of pred's shape,
    its weight of the anchor shape (broadcast over classes) or of pred's, its "mean" over
    every element (or sum / (avg_factor + eps))."""
    broadcast_weight = elementwise_weight(weight, pred)
    if backend == "reference":
        return weight_reduce_loss(reference_loss(), broadcast_weight, reduction, avg_factor)
    kernel_weight = _kernel_weight(pred, weight)
    if weight is not None and kernel_weight is None:
        return weight_reduce_loss(operator_loss(None, "none"), broadcast_weight, reduction, avg_factor)
    if reduction == "none":
        return operator_loss(kernel_weight, "none")
    total = operator_loss(kernel_weight, "sum")
    return total if reduction == "sum" else mean_of_sum(total, pred.numel(), avg_factor)


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
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Quality Focal Loss with (label, score) targets (mmdetection 3.x semantics).

    Args:
        pred: logits (N, C) or (B, C, d1, ..., dk) (probabilities if activated=True), float16,
            bfloat16, float32 or float64, any strides: a (B, C, H, W) head output is read in
            place.
        label: integer class per anchor, shape (N) or (B, d1, ..., dk), any integer dtype; a
            value in [0, C) marks a positive of that class, any other (C, -1, ...) is
            background.
        score: float IoU target of the positive class, label's shape.
        beta: the exponent of the modulating factor |y - sigma|^beta, a number >= 0.
        weight: per-anchor weight, label's shape.
        class_weight: (C,) weight of each class's term in the sum over classes.
        reduction: "none" (per-anchor loss, label's shape), "mean" or "sum".
        avg_factor: with "mean", the loss sum is divided by avg_factor + eps: a number, or a
            one-element tensor on pred's device (never read on the host).
        activated: pred holds probabilities, not logits. A probability outside [0, 1] makes
            its anchor's loss and gradient NaN (its log is not defined), in every backend.
        backend: "auto", "native", "triton" or "reference".

    Returns:
        The loss: float32 for float16/bfloat16 pred (float64 for float64), a 0-dim tensor
        or (reduction "none") label's shape. Its gradient has pred's dtype and layout.
    """
    op = "quality_focal_loss"
    _checks.check_class_pred(pred, op)
    _checks.check_label_and_score(pred, label, score, op)
    _checks.check_exponent(beta, "beta", op)
    _checks.check_flag(activated, "activated", op)
    _checks.check_class_weight(pred, class_weight, op)
    _check_reduction_arguments(pred, weight, tuple(label.shape), reduction, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    _checks.check_constant_targets(chosen, op, score=score, class_weight=class_weight)
    return _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred,
            label.long(),
            score.to(_accumulate_dtype(pred)),
            kernel_weight,
            _kernel_class_weight(pred, class_weight),
            float(beta),
            activated,
            kernel_reduction,
            chosen,
        ),
        lambda: reference.quality_focal_loss_per_anchor(pred, label, score, beta, activated, class_weight=class_weight),
        pred,
        weight,
        chosen,
        reduction,
        avg_factor,
        label.numel(),
    )


def quality_focal_loss_dense(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Quality Focal Loss against a dense soft target of pred's shape.

    mmdetection's quality_focal_loss_tensor_target; with beta=0 it is the soft-target BCE of
    YOLOv8 (summed over classes per anchor).

    Args:
        pred: as quality_focal_loss.
        target: float soft target of pred's shape, any strides. It is read at its own
            precision (in float32 maths, as the reference does): a float32 target of half
            logits is neither rounded to pred's dtype nor copied.
        beta, weight, class_weight, reduction, avg_factor, activated, backend: as
            quality_focal_loss (weight has pred's shape without dimension 1).

    Returns:
        As quality_focal_loss.
    """
    op = "quality_focal_loss_dense"
    _checks.check_class_pred(pred, op)
    _checks.check_dense_target(pred, target, op)
    _checks.check_exponent(beta, "beta", op)
    _checks.check_flag(activated, "activated", op)
    _checks.check_class_weight(pred, class_weight, op)
    _check_reduction_arguments(pred, weight, _ops.anchor_shape(pred), reduction, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    _checks.check_constant_targets(chosen, op, target=target, class_weight=class_weight)
    return _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred,
            _dense_target_for_kernel(pred, target),
            kernel_weight,
            _kernel_class_weight(pred, class_weight),
            float(beta),
            activated,
            kernel_reduction,
            chosen,
        ),
        lambda: reference.quality_focal_loss_dense_per_anchor(pred, target, beta, activated, class_weight=class_weight),
        pred,
        weight,
        chosen,
        reduction,
        avg_factor,
        pred.numel() // pred.shape[1],
    )


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Sigmoid focal loss (RetinaNet), elementwise: alpha_t (1 - p_t)^gamma BCE(pred, t).

    Args:
        pred: logits (N, C) or (B, C, d1, ..., dk) (probabilities if activated=True), any
            strides, as quality_focal_loss.
        target: integer labels of the anchor shape (pred's without dimension 1; a value in
            [0, C) is that class, any other is background: mmdetection's FocalLoss), or a
            float target of pred's shape, binary or soft (torchvision.ops.sigmoid_focal_loss).
        alpha: alpha_t = alpha t + (1 - alpha)(1 - t); None or a negative alpha switches the
            alpha weighting off (torchvision).
        gamma: the focusing exponent, a number >= 0.
        weight: the anchor shape (broadcast over classes) or pred's shape (mmdetection).
        class_weight: (C,) weight of each class's elements.
        reduction: "none" (pred's shape), "mean" (over every element, or sum / (avg_factor +
            eps)) or "sum".
        avg_factor, activated, backend: as quality_focal_loss.

    Returns:
        The loss, float32 for float16/bfloat16 pred (float64 for float64). Its gradient has
        pred's dtype and layout.
    """
    op = "sigmoid_focal_loss"
    _checks.check_class_pred(pred, op)
    dense = _checks.check_labels_or_dense_target(pred, target, op)
    alpha = _checks.check_alpha(alpha, op)
    _checks.check_exponent(gamma, "gamma", op)
    _checks.check_flag(activated, "activated", op)
    _checks.check_class_weight(pred, class_weight, op)
    _check_elementwise_reduction_arguments(pred, weight, reduction, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    _checks.check_constant_targets(chosen, op, target=target, class_weight=class_weight)
    kernel_target = _dense_target_for_kernel(pred, target) if dense else target.long()
    return _reduced_elementwise_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred,
            kernel_target,
            kernel_weight,
            _kernel_class_weight(pred, class_weight),
            float(alpha),
            float(gamma),
            activated,
            kernel_reduction,
            chosen,
        ),
        lambda: reference.sigmoid_focal_loss_elementwise(
            pred, target, alpha, gamma, activated, class_weight=class_weight
        ),
        pred,
        weight,
        chosen,
        reduction,
        avg_factor,
    )


def varifocal_loss(
    pred: Tensor,
    target: Union[Tensor, Tuple[Tensor, Tensor]],
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    detach_weight: bool = False,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Varifocal loss (VFNet), elementwise: BCE(pred, t) times t on positives (1 if not
    iou_weighted), alpha |p - t|^gamma on negatives.

    Args:
        pred: as sigmoid_focal_loss; activated=True takes probabilities (PP-YOLOE).
        target: a dense float IoU-aware target of pred's shape (mmdetection: t > 0 is a
            positive), or a (label, score) pair of the anchor shape as quality_focal_loss takes
            it (RT-DETR, ultralytics: the labelled class is a positive whatever its score, so
            a positive of score 0 has weight 0 when iou_weighted).
        alpha: the negatives' weight, a finite number.
        gamma: the exponent of |p - t| on negatives, a number >= 0.
        iou_weighted: a positive's weight is t (True) or 1 (False).
        detach_weight: the weight carries no gradient (the official RT-DETR, D-FINE and
            DEIM criteria); False is mmdetection's and ultralytics' (its RT-DETR port
            included): the negatives' weight is differentiated.
        weight, class_weight, reduction, avg_factor, backend: as sigmoid_focal_loss.

    Returns:
        As sigmoid_focal_loss.
    """
    op = "varifocal_loss"
    _checks.check_class_pred(pred, op)
    label, score, dense_target = _checks.check_varifocal_target(pred, target, op)
    alpha = _checks.check_finite(alpha, "alpha", op)
    _checks.check_exponent(gamma, "gamma", op)
    for name, flag in (("iou_weighted", iou_weighted), ("detach_weight", detach_weight), ("activated", activated)):
        _checks.check_flag(flag, name, op)
    _checks.check_class_weight(pred, class_weight, op)
    _check_elementwise_reduction_arguments(pred, weight, reduction, avg_factor, op)
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    targets = dict(target=dense_target) if dense_target is not None else dict(score=score)
    _checks.check_constant_targets(chosen, op, class_weight=class_weight, **targets)
    if dense_target is not None:
        kernel_target, kernel_score = _dense_target_for_kernel(pred, dense_target), None
    else:
        kernel_target, kernel_score = label.long(), score.to(_accumulate_dtype(pred))
    return _reduced_elementwise_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            pred,
            kernel_target,
            kernel_score,
            kernel_weight,
            _kernel_class_weight(pred, class_weight),
            float(alpha),
            float(gamma),
            iou_weighted,
            detach_weight,
            activated,
            kernel_reduction,
            chosen,
        ),
        lambda: reference.varifocal_loss_elementwise(
            pred,
            dense_target if dense_target is not None else label,
            score,
            alpha,
            gamma,
            iou_weighted,
            detach_weight,
            activated,
            class_weight=class_weight,
        ),
        pred,
        weight,
        chosen,
        reduction,
        avg_factor,
    )


def _check_elementwise_reduction_arguments(
    pred: Tensor, weight: Optional[Tensor], reduction: str, avg_factor: AvgFactor, op: str
) -> None:
    """As _check_reduction_arguments, with the elementwise losses' two weight shapes."""
    check_reduction(reduction, avg_factor)
    if weight is not None:
        _checks.require_tensor(weight, "weight", op)
        shape = tuple(pred.shape) if weight.dim() == pred.dim() else _ops.anchor_shape(pred)
        _checks.check_weight(pred, weight, shape, op, also=tuple(pred.shape))
    _checks.check_avg_factor(pred, avg_factor, op)


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    validate: Optional[bool] = None,
    backend: str = "auto",
) -> Tensor:
    """Distribution Focal Loss: cross-entropy on the two bins around a continuous target.

    Args:
        pred: (..., n + 1) logits over bins 0..n in the last dimension (GFL: reg_max + 1 =
            17 bins; ultralytics: 16 bins): mmdetection's (M, n + 1) rows or ultralytics'
            (M, 4, n + 1) sides. (M, n + 1) is read through its strides; other shapes
            become rows of bins (a view when the leading dimensions merge, else a copy).
        target: float of pred.shape[:-1], in [0, n]; target == n is valid.
        weight: a weight of target's shape or one that broadcasts to it, e.g. ultralytics'
            (M, 1) per box over its 4 sides.
        reduction, avg_factor, backend: as quality_focal_loss; "mean" averages over the
            target's elements.
        validate: whether a target outside [0, n] (or NaN) raises a ValueError. None (the
            default) checks CPU tensors only, where reading the target's range costs no
            device sync; True checks on every device (on CUDA a host sync per call: for
            debugging); False never checks. Unchecked, the kernels clamp the target into
            [0, n] (NaN -> 0): nothing is read out of bounds whatever the target holds.

    Returns:
        The loss, float32 for half pred (float64 for float64): 0-dim, or target's shape for
        "none".
    """
    op = "distribution_focal_loss"
    _checks.check_bins(pred, op)
    _checks.require_tensor(target, "target", op)
    _checks.check_same_device(pred, target, "target", op)
    if tuple(target.shape) != tuple(pred.shape[:-1]):
        raise ValueError(
            f"{op}: target must have shape {tuple(pred.shape[:-1])} (pred's without its bins), "
            f"got {tuple(target.shape)}"
        )
    if not target.dtype.is_floating_point:
        raise TypeError(f"{op}: target must be a floating-point tensor, got {target.dtype}")
    _checks.check_validate(validate, op)
    check_reduction(reduction, avg_factor)
    weight = _checks.broadcast_weight(pred, weight, tuple(target.shape), op)
    _checks.check_avg_factor(pred, avg_factor, op)
    _checks.validate_dfl_target_range(target, pred.shape[-1] - 1, validate)
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    _checks.check_constant_targets(chosen, op, target=target)
    rows = pred if pred.dim() == 2 else pred.reshape(-1, pred.shape[-1])
    row_target = target.reshape(-1)
    row_weight = None if weight is None else weight.reshape(-1)
    loss = _reduced_loss(
        lambda kernel_weight, kernel_reduction: _ops.operator(op, chosen)(
            rows,
            row_target.to(_accumulate_dtype(pred)),
            kernel_weight,
            kernel_reduction,
            chosen,
        ),
        lambda: reference.distribution_focal_loss_per_row(rows, row_target),
        rows,
        row_weight,
        chosen,
        reduction,
        avg_factor,
        rows.shape[0],
    )
    return loss.view(target.shape) if reduction == "none" else loss


def distribution_integral(pred: Tensor, *, backend: str = "auto") -> Tensor:
    """E = sum_k softmax(pred)_k * k over the last dimension (GFL's Integral), differentiable.

    Args:
        pred: (..., n + 1) logits over bins 0..n, n + 1 >= 2.
        backend: as quality_focal_loss.

    Returns:
        E, shape (...), in pred's dtype (computed in float32 for half pred).
    """
    op = "distribution_integral"
    _checks.check_pred(pred, op)
    if pred.dim() < 1 or pred.shape[-1] < 2:
        raise ValueError(f"{op}: the last dimension of pred must hold at least 2 bins, got shape {tuple(pred.shape)}")
    chosen = _backends.resolve_backend(backend, pred.device, op, pred.dtype)
    if chosen == "reference":
        return reference.distribution_integral(pred)
    # (M, n + 1) is read through its strides; other shapes become rows of bins (a view
    # when the leading dimensions merge, a copy otherwise).
    rows = pred if pred.dim() == 2 else pred.reshape(-1, pred.shape[-1])
    return _ops.operator(op, chosen)(rows, chosen).view(pred.shape[:-1])
