"""The code users run today, imported from their frameworks: the benchmark's peers.

    mmdet        mmdetection 3.x's loss modules (QualityFocalLoss, DistributionFocalLoss,
                 FocalLoss, VarifocalLoss) and GFLHead's Integral, called as its heads call
                 them: a channel-first head output is permuted and reshaped to (N, C) first
    torchvision  torchvision.ops.sigmoid_focal_loss on the one-hot target that RetinaNet's
                 head builds from the labels
    ultralytics  ultralytics.utils.loss.VarifocalLoss, normalised as RT-DETR's criterion does

Nothing of the frameworks is copied: what is timed is their own code, as installed. A peer
provides where its framework imports (mmdetection's loss modules import mmcv.ops: mmcv
built with its ops); otherwise `unavailable_reason` says why. The work of turning the
benchmark's inputs into a framework's own forms (one-hot labels, (N, C) rows) is part of
what is timed, as the framework's users pay it. Each peer has the provider signature
fn(pred, *args, **options) of its op's inputs (ops/*.py).
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Union

import torch
from torch import Tensor

AvgFactor = Optional[Union[float, Tensor]]

# The module each peer imports its code from.
FRAMEWORK_MODULES = {
    "mmdet": "mmdet.models.losses",
    "torchvision": "torchvision.ops",
    "ultralytics": "ultralytics.utils.loss",
}


@functools.lru_cache(maxsize=None)
def unavailable_reason(peer: str) -> Optional[str]:
    """None where the peer's framework imports here, else why it does not."""
    try:
        importlib.import_module(FRAMEWORK_MODULES[peer])
    except Exception as error:  # an absent package, or one that fails on import (mmcv.ops)
        return f"{FRAMEWORK_MODULES[peer]} does not import: {type(error).__name__}: {error}"
    return None


def flatten_channel_first(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C), as mmdetection's heads reshape their outputs before the
    loss (a copy of the whole map); (N, C) stays as it is."""
    if x.dim() == 2:
        return x
    return x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1])


@functools.lru_cache(maxsize=None)
def _mmdet_loss(name: str, **options):
    """An mmdetection loss module (loss_weight 1), built once per configuration."""
    return getattr(importlib.import_module(FRAMEWORK_MODULES["mmdet"]), name)(**options)


def _flat(weight: Optional[Tensor]) -> Optional[Tensor]:
    return None if weight is None else weight.reshape(-1)


def mmdet_qfl(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
) -> Tensor:
    """QualityFocalLoss with (label, score), as GFLHead calls it."""
    loss = _mmdet_loss("QualityFocalLoss", beta=beta, activated=activated, reduction=reduction)
    target = (label.reshape(-1), score.reshape(-1))
    return loss(flatten_channel_first(pred), target, weight=_flat(weight), avg_factor=avg_factor)


def mmdet_qfl_dense(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
    activated: bool = False,
) -> Tensor:
    """QualityFocalLoss with a dense target (its tensor-target form)."""
    loss = _mmdet_loss("QualityFocalLoss", beta=beta, activated=activated, reduction=reduction)
    rows = flatten_channel_first(pred)
    return loss(rows, flatten_channel_first(target), weight=_flat(weight), avg_factor=avg_factor)


def mmdet_dfl(
    pred: Tensor, target: Tensor, *, weight: Optional[Tensor] = None, reduction: str = "mean", avg_factor=None
) -> Tensor:
    """DistributionFocalLoss over rows of bins."""
    return _mmdet_loss("DistributionFocalLoss", reduction=reduction)(pred, target, weight=weight, avg_factor=avg_factor)


def mmdet_focal(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """FocalLoss with labels (background = C): on the CPU its eager form (one-hot, then
    py_sigmoid_focal_loss), on CUDA mmcv's compiled op."""
    loss = _mmdet_loss("FocalLoss", alpha=alpha, gamma=gamma, reduction=reduction)
    if weight is not None:  # per anchor, or per element: pred's shape, flattened as pred is
        weight = flatten_channel_first(weight) if weight.dim() == pred.dim() else weight.reshape(-1)
    return loss(flatten_channel_first(pred), target.reshape(-1), weight=weight, avg_factor=avg_factor)


def mmdet_varifocal(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: AvgFactor = None,
) -> Tensor:
    """VarifocalLoss with a dense IoU-aware target of pred's shape, as VFNetHead calls it."""
    loss = _mmdet_loss("VarifocalLoss", alpha=alpha, gamma=gamma, reduction=reduction)
    return loss(pred, target, weight=weight, avg_factor=avg_factor)


def mmdet_integral(num_bins: int, device: torch.device):
    """GFLHead's Integral module over rows of bins (M, n + 1) -> (M); M a multiple of 4, the
    sides of a box, as GFLHead passes them."""
    from mmdet.models.dense_heads.gfl_head import Integral

    integral = Integral(reg_max=num_bins - 1).to(device)
    return lambda pred: integral(pred).reshape(-1)


def torchvision_focal(
    pred: Tensor, target: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, avg_factor: AvgFactor = None, **_options
) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss(reduction="sum") / num_foreground, as torchvision's
    RetinaNet head calls it, on the float one-hot target that head builds from the labels
    (background = C)."""
    from torchvision.ops import sigmoid_focal_loss

    inputs = flatten_channel_first(pred)
    num_classes = inputs.shape[1]
    labels = target.reshape(-1)
    targets = torch.zeros_like(inputs)
    foreground = (labels >= 0) & (labels < num_classes)
    targets[foreground.nonzero().squeeze(1), labels[foreground]] = 1.0
    return sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="sum") / avg_factor


def ultralytics_varifocal(
    pred: Tensor, target: Tensor, *, alpha: float = 0.75, gamma: float = 2.0, avg_factor: AvgFactor = None, **_options
) -> Tensor:
    """VarifocalLoss()(pred_score, gt_score, label) with gt_score the dense IoU-aware target
    and label its one-hot (gt_score > 0); its .mean(1).sum() times C / num_boxes
    (avg_factor), as RT-DETR's criterion normalises it."""
    from ultralytics.utils.loss import VarifocalLoss

    loss = VarifocalLoss(gamma=gamma, alpha=alpha)(pred, target, (target > 0).to(pred.dtype))
    return loss * pred.shape[1] / avg_factor
