"""mmdetection 3.x's losses (mmdet/models/losses/gfocal_loss.py, focal_loss.py,
varifocal_loss.py, utils.py) re-derived from the formulas of docs/MATH.md: an eager
oracle for the modules' tests (test_nn.py) that needs no mmdetection installed. The
adapters are tested against mmdetection itself in tests/integrations/. Everything runs in
pred's dtype, as mmdetection does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

AvgFactor = Optional[Union[float, Tensor]]


# --------------------------------------------------------------------------------------
# mmdet/models/losses/utils.py
# --------------------------------------------------------------------------------------


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def weight_reduce_loss(
    loss: Tensor, weight: Optional[Tensor] = None, reduction: str = "mean", avg_factor: AvgFactor = None
) -> Tensor:
    """loss * weight; then reduce_loss, or sum / (avg_factor + eps) for "mean" with avg_factor."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        eps = torch.finfo(torch.float32).eps
        return loss.sum() / (avg_factor + eps)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def flatten_channel_first(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B * H * W, C), as the GFL head does per level: a copy."""
    if x.dim() == 2:
        return x
    return x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1])


# --------------------------------------------------------------------------------------
# mmdet/models/losses/gfocal_loss.py: per-anchor losses (before weight_reduce_loss)
# --------------------------------------------------------------------------------------


def quality_focal_loss(pred: Tensor, label: Tensor, score: Tensor, beta: float = 2.0) -> Tensor:
    """QFL on logits pred (N, C); label (N) with background = C; score (N) the IoU target."""
    pred_sigmoid = pred.sigmoid()
    # Every element first as a negative: BCE against 0, modulated by sigma^beta.
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)

    # Then the positives, found on the host, overwritten with BCE against the IoU score.
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def quality_focal_loss_with_prob(pred: Tensor, label: Tensor, score: Tensor, beta: float = 2.0) -> Tensor:
    """QFL on probabilities pred (N, C) ("activated"), with F.binary_cross_entropy."""
    pred_sigmoid = pred
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy(pred, zerolabel, reduction="none") * scale_factor.pow(beta)

    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def quality_focal_loss_tensor_target(
    pred: Tensor, target: Tensor, beta: float = 2.0, activated: bool = False
) -> Tensor:
    """QFL against a dense soft target of pred's shape; positives are target != 0."""
    assert pred.size() == target.size()
    if activated:
        pred_sigmoid = pred
        loss_function = F.binary_cross_entropy
    else:
        pred_sigmoid = pred.sigmoid()
        loss_function = F.binary_cross_entropy_with_logits
    scale_factor = pred_sigmoid
    target = target.type_as(pred)

    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = loss_function(pred, zerolabel, reduction="none") * scale_factor.pow(beta)

    pos = target != 0
    scale_factor = target[pos] - pred_sigmoid[pos]
    loss[pos] = loss_function(pred[pos], target[pos], reduction="none") * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def distribution_focal_loss(pred: Tensor, label: Tensor) -> Tensor:
    """DFL on pred (M, n + 1) logits, label (M) float in [0, n): two cross-entropies."""
    dis_left = label.long()
    dis_right = dis_left + 1
    weight_left = dis_right.float() - label
    weight_right = label - dis_left.float()
    return (
        F.cross_entropy(pred, dis_left, reduction="none") * weight_left
        + F.cross_entropy(pred, dis_right, reduction="none") * weight_right
    )


# --------------------------------------------------------------------------------------
# mmdet/models/losses/focal_loss.py and varifocal_loss.py (the eager forms, as the CPU
# runs them; on CUDA FocalLoss calls mmcv's op, which has no bfloat16)
# --------------------------------------------------------------------------------------


def focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """FocalLoss.forward with labels (N) (background = C): one-hot over C + 1 columns with the
    last dropped, then py_sigmoid_focal_loss, elementwise (N, C)."""
    pred = flatten_channel_first(pred)
    num_classes = pred.size(1)
    target = F.one_hot(target.reshape(-1), num_classes=num_classes + 1)[:, :num_classes].type_as(pred)
    pred_sigmoid = pred.sigmoid()
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None and weight.shape != loss.shape:
        # (N,) per anchor, or (N * C,) per element flattened (FSAF)
        weight = weight.view(-1, 1) if weight.size(0) == loss.size(0) else weight.view(loss.size(0), -1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def varifocal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """varifocal_loss with a dense IoU-aware target of pred's shape."""
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    positive = (target > 0.0).float()
    focal_weight = (target * positive if iou_weighted else positive) + alpha * (pred_sigmoid - target).abs().pow(
        gamma
    ) * (target <= 0.0).float()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return weight_reduce_loss(loss, weight, reduction, avg_factor)
