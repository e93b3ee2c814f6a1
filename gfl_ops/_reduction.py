"""The loss reductions of mmdetection 3.x (mmdet/models/losses/utils.py::weight_reduce_loss).

The reference applies them to its per-anchor losses (weight_reduce_loss). The compiled
backends apply the weight and the sum inside their operators, and take the mean of that
sum with the same mean_of_sum, so a loss differs between backends only in how its values
are computed and added up.

The dtype of every loss, whichever backend computes it, is pred's computation dtype:
float32 for float16, bfloat16 and float32 pred, float64 for float64 pred. A weight or
avg_factor of another dtype (a float64 weight of float32 pred) is read in that dtype and
does not promote the loss; a weight that requires grad gets its gradient in its own dtype.
(mmdetection's arithmetic promotes instead: its adapter, gfl_ops.integrations.mmdet, does
that on top.)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")
_FLOAT32_EPS = torch.finfo(torch.float32).eps


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(reduction: str, avg_factor) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sum" and avg_factor is not None:
        raise ValueError('avg_factor can not be used with reduction="sum"')


def mean_of_sum(total: Tensor, count: int, avg_factor: Optional[Union[float, Tensor]] = None) -> Tensor:
    """The "mean" of losses that add up to `total`: total / count, or total / (avg_factor +
    eps). A mean over no elements is 0 (not NaN), so an image batch without anchors trains on.
    avg_factor may be a one-element tensor: it is never read on the host."""
    if avg_factor is None:
        return total / max(count, 1)
    if not isinstance(avg_factor, Tensor):
        return total / (avg_factor + _FLOAT32_EPS)
    # eps added in avg_factor's dtype, as mmdetection does; a (1,) tensor too gives a 0-dim
    # loss, and in the loss's dtype (the module's rule).
    return total / (avg_factor.reshape(()) + _FLOAT32_EPS).to(total.dtype)


def elementwise_weight(weight: Optional[Tensor], loss: Tensor) -> Optional[Tensor]:
    """The weight of an elementwise loss (focal, varifocal: pred's shape) as mmdetection
    applies it: one per anchor, viewed with a class dimension 1 of size 1 to broadcast over
    the classes (its weight.view(-1, 1)), or one per element as it is."""
    if weight is not None and weight.dim() == loss.dim() - 1:
        return weight.unsqueeze(1)
    return weight


def weight_reduce_loss(
    loss: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    """loss * weight, then "none" | "sum" | "mean" (sum / (avg_factor + eps) with avg_factor).
    The weight is read in the loss's dtype (the module's rule)."""
    check_reduction(reduction, avg_factor)
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return mean_of_sum(loss.sum(), loss.numel(), avg_factor)
