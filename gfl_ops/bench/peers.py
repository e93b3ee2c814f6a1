"""The focal family as the other frameworks users train with write it, eager: benchmark
peers besides mmdet_style.py. Copied from the formulas of their sources (named per
function), with the provider signature fn(pred, target, **options) of the benchmark's
inputs; the work of turning those inputs into the framework's own target form (one-hot
labels) is part of what is timed, as the framework's users pay it.

Licences of the formulas reproduced: torchvision's BSD-3-Clause; ultralytics' AGPL-3.0
(ultralytics_varifocal_loss, which is distributed under the AGPL-3.0, LICENSE-AGPL-3.0).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .mmdet_style import flatten_channel_first


def torchvision_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    avg_factor: Optional[Tensor] = None,
    **_options,
) -> Tensor:
    """torchvision/ops/focal_loss.py, sigmoid_focal_loss(inputs, targets, alpha, gamma,
    reduction="sum") / num_foreground, as torchvision's RetinaNet head calls it, on a float
    one-hot target built from the labels (background = C) as that head builds it."""
    inputs = flatten_channel_first(pred)
    num_classes = inputs.shape[1]
    labels = target.reshape(-1)
    targets = torch.zeros_like(inputs)
    foreground = (labels >= 0) & (labels < num_classes)
    targets[foreground.nonzero().squeeze(1), labels[foreground]] = 1.0
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.sum() / avg_factor


def ultralytics_varifocal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    avg_factor: Optional[Tensor] = None,
    **_options,
) -> Tensor:
    """ultralytics/utils/loss.py, VarifocalLoss.forward(pred_score, gt_score, label) with
    gt_score the dense IoU-aware target and label its one-hot (gt_score > 0): the weight
    alpha p^gamma (1 - label) + gt_score label, the BCE in float32 with autocast off, and
    .mean(1).sum() (the mean over the class dimension 1 of pred); then, as RT-DETR's
    criterion normalises it, * C / num_boxes (avg_factor): the benchmark's loss."""
    label = (target > 0).to(pred.dtype)
    weight = alpha * pred.sigmoid().pow(gamma) * (1 - label) + target * label
    with torch.autocast(device_type=pred.device.type, enabled=False):
        loss = F.binary_cross_entropy_with_logits(pred.float(), target.float(), reduction="none") * weight
        return loss.mean(1).sum() * pred.shape[1] / avg_factor
