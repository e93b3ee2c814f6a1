"""gfl_ops' fused losses in mmdetection 3.x.

Importing this module (in Python, or from a config with
``custom_imports = dict(imports=["gfl_ops.integrations.mmdet"], allow_failed_imports=False)``)
registers in mmdetection's MODELS registry:

    FusedQualityFocalLoss, FusedDistributionFocalLoss, FusedFocalLoss, FusedVarifocalLoss,
    FusedIntegral

each a subclass of mmdetection's class of the stock name, so heads that route on
``isinstance(self.loss_cls, QualityFocalLoss)`` (DETR, DINO, Grounding DINO) treat it as
theirs. A config then names them: ``loss_cls=dict(type="FusedQualityFocalLoss", beta=2.0)``.

To make an unchanged config train with them, opt in to the stock names:
``use_fused_losses()`` (or import gfl_ops.integrations.mmdet.stock_names from the config's
custom_imports): "QualityFocalLoss", "DistributionFocalLoss", "FocalLoss" and
"VarifocalLoss" then build the fused classes, and GFLHead (and LDHead, built on it) build
a FusedIntegral; ``restore_stock_losses()`` undoes both. ``swap_integral(model)`` puts a
FusedIntegral into a model built before.

Differences from mmdetection's classes, by design:
- the loss of float16/bfloat16 pred is float32 (mmdetection's is pred's dtype);
- the "mean" of an empty input is 0 (mmdetection's is NaN);
- arguments are checked (gfl_ops' errors, which name the argument); a bad
  reduction_override raises ReductionOverrideError, both a ValueError (gfl_ops' rule)
  and an AssertionError (what mmdetection raises and its tests expect).
As mmdetection, a float64 weight (or DFL target) promotes the loss to float64.

The classes subclass mmdetection 3.3's (Apache-2.0, as gfl_ops) and keep their contract;
no mmdetection code is reproduced here.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from mmdet.models.dense_heads import gfl_head as _gfl_head
from mmdet.models.losses import DistributionFocalLoss, FocalLoss, QualityFocalLoss, VarifocalLoss
from mmdet.registry import MODELS
from torch import Tensor

from ... import _checks, nn as gfl_nn
from ..._reduction import REDUCTIONS

__all__ = [
    "FusedDistributionFocalLoss",
    "FusedFocalLoss",
    "FusedIntegral",
    "FusedQualityFocalLoss",
    "FusedVarifocalLoss",
    "ReductionOverrideError",
    "restore_stock_losses",
    "swap_integral",
    "use_fused_losses",
    "using_fused_losses",
]


class ReductionOverrideError(ValueError, AssertionError):
    """A reduction_override outside (None, "none", "mean", "sum")."""


def _check_reduction_override(override, name: str) -> None:
    if override is not None and override not in REDUCTIONS:
        raise ReductionOverrideError(
            f"{name}: reduction_override must be None or one of {REDUCTIONS}, got {override!r}"
        )


def _promoted(loss: Tensor, *others: Optional[Tensor]) -> Tensor:
    """The loss in the dtype mmdetection's arithmetic would give it: promoted with the
    floating-point tensors it multiplies (a float64 weight makes a float64 loss)."""
    dtype = loss.dtype
    for other in others:
        if isinstance(other, Tensor) and other.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, other.dtype)
    return loss if dtype == loss.dtype else loss.to(dtype)


class _StockContract:
    """What the fused classes add to gfl_ops.nn's forward for mmdetection: its
    reduction_override error and its dtype promotion (DFL: by the target too)."""

    _promotes_with_target = False

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        _check_reduction_override(reduction_override, type(self).__name__)
        loss = super().forward(pred, target, weight, avg_factor, reduction_override)
        return _promoted(loss, weight, target if self._promotes_with_target else None)


class FusedQualityFocalLoss(_StockContract, gfl_nn.QualityFocalLoss, QualityFocalLoss):
    """gfl_ops.nn.QualityFocalLoss as an mmdetection QualityFocalLoss (same constructor,
    plus backend)."""


class FusedFocalLoss(_StockContract, gfl_nn.FocalLoss, FocalLoss):
    """gfl_ops.nn.FocalLoss as an mmdetection FocalLoss (use_sigmoid=True only)."""


class FusedVarifocalLoss(_StockContract, gfl_nn.VarifocalLoss, VarifocalLoss):
    """gfl_ops.nn.VarifocalLoss as an mmdetection VarifocalLoss (use_sigmoid=True only)."""


class FusedDistributionFocalLoss(_StockContract, gfl_nn.DistributionFocalLoss, DistributionFocalLoss):
    """gfl_ops.nn.DistributionFocalLoss as an mmdetection DistributionFocalLoss: reg_max + 1
    bins in pred's last dimension."""

    _promotes_with_target = True


class FusedIntegral(_gfl_head.Integral):
    """mmdetection's Integral (its `project` buffer, so its checkpoints load strictly) on
    the fused distribution integral: x (N, 4 * (reg_max + 1)) -> (N, 4)."""

    def __init__(self, reg_max: int = 16, backend: str = "auto") -> None:
        checked = gfl_nn.Integral(reg_max, backend)  # gfl_ops' argument checks
        super().__init__(checked.reg_max)
        self.backend = backend

    forward = gfl_nn.Integral.forward
    extra_repr = gfl_nn.Integral.extra_repr


_FUSED = {
    "QualityFocalLoss": FusedQualityFocalLoss,
    "DistributionFocalLoss": FusedDistributionFocalLoss,
    "FocalLoss": FusedFocalLoss,
    "VarifocalLoss": FusedVarifocalLoss,
}
_STOCK = {
    "QualityFocalLoss": QualityFocalLoss,
    "DistributionFocalLoss": DistributionFocalLoss,
    "FocalLoss": FocalLoss,
    "VarifocalLoss": VarifocalLoss,
}
# The module whose import opts in from a config's custom_imports.
_STOCK_NAMES_MODULE = f"{__name__}.stock_names"


def _stock_integral() -> type:
    """mmdetection's own Integral, found through whatever gfl_head.Integral holds now: every
    FusedIntegral (of this module, or of an earlier copy of it before a reload) subclasses it."""
    for cls in _gfl_head.Integral.__mro__:
        if cls.__module__ == _gfl_head.__name__ and cls.__name__ == "Integral":
            return cls
    raise RuntimeError(f"mmdetection's gfl_head.Integral ({_gfl_head.Integral!r}) is not its Integral")


for _stock_name, _fused_class in _FUSED.items():
    MODELS.register_module(name=f"Fused{_stock_name}", module=_fused_class, force=True)
MODELS.register_module(name="FusedIntegral", module=FusedIntegral, force=True)


def use_fused_losses() -> None:
    """Make the stock names build the fused classes (QualityFocalLoss, DistributionFocalLoss,
    FocalLoss, VarifocalLoss), and GFLHead (LDHead) build a FusedIntegral: an unchanged
    config trains on the fused kernels. Models built before keep what they hold."""
    for stock_name, fused_class in _FUSED.items():
        MODELS.register_module(name=stock_name, module=fused_class, force=True)
    _gfl_head.Integral = FusedIntegral


def restore_stock_losses() -> None:
    """Undo use_fused_losses(): the stock names build mmdetection's own classes again and
    GFLHead its own Integral. The opt-in by import is undone too: a later config whose
    custom_imports names gfl_ops.integrations.mmdet.stock_names opts in again (Python would
    otherwise find that module imported and not run it)."""
    for stock_name, stock_class in _STOCK.items():
        MODELS.register_module(name=stock_name, module=stock_class, force=True)
    _gfl_head.Integral = _stock_integral()
    sys.modules.pop(_STOCK_NAMES_MODULE, None)
    sys.modules[__name__].__dict__.pop("stock_names", None)


def _is_fused(cls) -> bool:
    """A class of this adapter (by module and name, so that a copy from before a reload counts)."""
    return getattr(cls, "__module__", None) == __name__ and getattr(cls, "__name__", "").startswith("Fused")


def using_fused_losses() -> bool:
    """Whether the stock names build the fused classes now, and GFLHead a FusedIntegral."""
    return _is_fused(MODELS.get("QualityFocalLoss")) and _is_fused(_gfl_head.Integral)


def swap_integral(model: torch.nn.Module, backend: str = "auto") -> int:
    """Replace every mmdetection Integral inside model by a FusedIntegral of the same
    reg_max (its project buffer moved over, on its device); returns how many it replaced."""
    _checks.check_backend_name(backend, "swap_integral")
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _stock_integral()) and not isinstance(child, FusedIntegral):
                fused = FusedIntegral(child.reg_max, backend)
                fused.project = child.project
                setattr(parent, child_name, fused)
                replaced += 1
    return replaced
