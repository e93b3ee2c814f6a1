"""Generalized Focal Loss in plain PyTorch: the oracle every kernel is tested against.

Branch-free (no nonzero, no .item(), no host sync), differentiable by autograd, written
straight from the equations of GFL_MATH.md with torch's own BCE functions. Half inputs are
computed in float32; losses come back in float32 (float64 for float64 inputs).

The `*_per_anchor` / `*_per_row` functions return unreduced losses; the public-style
functions below them add weight and reduction exactly as the fast backends do.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._reduction import weight_reduce_loss


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_target_from_labels(pred: Tensor, label: Tensor, score: Tensor) -> Tensor:
    """The (N, C) / (B, C, d...) QFL target: score on the labelled class, 0 elsewhere.

    A label outside [0, C) (background: C, -1, ...) matches no class.
    """
    num_classes = pred.shape[1]
    class_shape = (1, num_classes) + (1,) * (pred.dim() - 2)
    classes = torch.arange(num_classes, device=pred.device).view(class_shape)
    is_positive = label.unsqueeze(1) == classes
    return torch.where(is_positive, score.unsqueeze(1).to(accumulate_dtype(pred.dtype)), 0.0)


def quality_focal_loss_dense_per_anchor(
    pred: Tensor, target: Tensor, beta: float = 2.0, activated: bool = False
) -> Tensor:
    """sum over classes of |sigma(x) - y|^beta * BCE(x, y); pred is p (not x) if activated."""
    dtype = accumulate_dtype(pred.dtype)
    x = pred.to(dtype)
    y = target.to(dtype)
    if activated:
        probability = x
        bce = F.binary_cross_entropy(x, y, reduction="none")
    else:
        probability = torch.sigmoid(x)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    modulating_factor = (probability - y).abs().pow(beta)
    return (modulating_factor * bce).sum(dim=1)


def quality_focal_loss_per_anchor(
    pred: Tensor, label: Tensor, score: Tensor, beta: float = 2.0, activated: bool = False
) -> Tensor:
    target = dense_target_from_labels(pred, label, score)
    return quality_focal_loss_dense_per_anchor(pred, target, beta, activated)


def distribution_focal_loss_per_row(pred: Tensor, target: Tensor) -> Tensor:
    """lse(z) - w_l * z_i - w_r * z_{i+1} with i = min(floor(y), n - 1); y is clamped to [0, n]."""
    dtype = accumulate_dtype(pred.dtype)
    z = pred.to(dtype)
    last_bin = z.shape[1] - 1
    y = torch.nan_to_num(target.to(dtype), nan=0.0).clamp(0, last_bin)
    left = y.floor().clamp(max=last_bin - 1)
    weight_left = (left + 1) - y
    weight_right = 1 - weight_left
    log_softmax = z.log_softmax(dim=1)
    left_index = left.long().unsqueeze(1)
    log_p_left = log_softmax.gather(1, left_index).squeeze(1)
    log_p_right = log_softmax.gather(1, left_index + 1).squeeze(1)
    return -(weight_left * log_p_left + weight_right * log_p_right)


def distribution_integral(pred: Tensor) -> Tensor:
    """E = sum_k softmax(z)_k * k over the last dimension, in pred's dtype."""
    dtype = accumulate_dtype(pred.dtype)
    z = pred.to(dtype)
    bins = torch.arange(z.shape[-1], device=z.device, dtype=dtype)
    return (z.softmax(dim=-1) * bins).sum(dim=-1).to(pred.dtype)


def quality_focal_loss(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    loss = quality_focal_loss_per_anchor(pred, label, score, beta, activated)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def quality_focal_loss_dense(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    loss = quality_focal_loss_dense_per_anchor(pred, target, beta, activated)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    loss = distribution_focal_loss_per_row(pred, target)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)
