"""Loss modules with mmdetection 3.x's constructors and forward signatures.

They drop into an mmdetection config (register them under a name of your choice, see the
README) or a plain training loop:

    loss_cls = gfl_ops.nn.QualityFocalLoss(beta=2.0, loss_weight=1.0)
    loss = loss_cls(cls_score, (labels, scores), weight=label_weights, avg_factor=num_pos)
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _checks, functional
from ._checks import AvgFactor
from ._reduction import REDUCTIONS


def _reduction(default: str, override: Optional[str]) -> str:
    """The reduction of one call: reduction_override when given, else the module's."""
    if override is not None and override not in REDUCTIONS:
        raise ValueError(f"reduction_override must be None or one of {REDUCTIONS}, got {override!r}")
    return override if override else default


class _ClassificationLoss(nn.Module):
    """What the classification modules share: mmdetection's use_sigmoid (True only),
    reduction and loss_weight, and activated and backend, checked when the model is built."""

    def __init__(self, use_sigmoid: bool, reduction: str, loss_weight: float, activated: bool, backend: str) -> None:
        super().__init__()
        name = type(self).__name__
        if use_sigmoid is not True:
            raise ValueError(f"{name}: only the sigmoid form (use_sigmoid=True) is supported")
        _checks.check_module_reduction(reduction, name)
        _checks.check_loss_weight(loss_weight, name)
        _checks.check_flag(activated, "activated", name)
        _checks.check_backend_name(backend, name)
        self.use_sigmoid = use_sigmoid
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated
        self.backend = backend

    def _options(self, weight: Optional[Tensor], avg_factor: AvgFactor, reduction_override: Optional[str]) -> dict:
        """The functional API's keyword arguments every call shares."""
        return dict(
            weight=weight,
            reduction=_reduction(self.reduction, reduction_override),
            avg_factor=avg_factor,
            activated=self.activated,
            backend=self.backend,
        )

    def _common_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, activated={self.activated}, "
            f"backend={self.backend!r}"
        )


class QualityFocalLoss(_ClassificationLoss):
    """Quality Focal Loss (GFL), as mmdet.models.losses.QualityFocalLoss.

    forward(pred, target, weight=None, avg_factor=None, reduction_override=None), where
    target is a (label, score) pair or a dense soft target of pred's shape.
    """

    def __init__(
        self,
        use_sigmoid: bool = True,
        beta: float = 2.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(use_sigmoid, reduction, loss_weight, activated, backend)
        _checks.check_exponent(beta, "beta", "QualityFocalLoss")
        self.beta = beta

    def forward(
        self,
        pred: Tensor,
        target: Union[Tensor, Tuple[Tensor, Tensor]],
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        options = dict(beta=self.beta, **self._options(weight, avg_factor, reduction_override))
        if isinstance(target, Tensor):
            loss = functional.quality_focal_loss_dense(pred, target, **options)
        else:
            if not (isinstance(target, (tuple, list)) and len(target) == 2):
                raise TypeError("QualityFocalLoss: target must be (label, score) or a dense tensor of pred's shape")
            label, score = target
            loss = functional.quality_focal_loss(pred, label, score, **options)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {self._common_repr()}"


def _elementwise_weight(pred: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    """mmdetection's focal weights (py_sigmoid_focal_loss): pred's shape or the anchor shape
    as they are; for (N, C) pred also (N, 1), one per anchor, and (N * C,) flattened per
    class (FSAF), viewed as pred's shape."""
    if weight is None or pred.dim() != 2 or weight.shape == pred.shape or weight.dim() == 0:
        return weight
    if weight.shape[0] == pred.shape[0] and weight.numel() == pred.shape[0]:
        return weight.reshape(pred.shape[0])
    if weight.dim() == 1 and weight.numel() == pred.numel():
        return weight.view(pred.shape)
    return weight


def _as_one_class_rows(pred: Tensor, target):
    """mmdetection's elementwise losses also take a 1-D pred whose target has its shape
    (GroundingDINOHead masks its (B, Q, C) scores, labels and weights down to vectors): each
    element becomes an anchor of one class, (N,) -> (N, 1), its weight an anchor weight.
    Returns pred, target and whether they were vectors."""
    if pred.dim() != 1 or not isinstance(target, Tensor) or target.dim() != 1:
        return pred, target, False
    return pred.unsqueeze(1), target.unsqueeze(1), True


def _as_vector(loss: Tensor, was_vector: bool) -> Tensor:
    """The elementwise loss of a 1-D pred back to pred's shape ((N, 1) -> (N,))."""
    return loss.view(-1) if was_vector and loss.dim() == 2 else loss


class FocalLoss(_ClassificationLoss):
    """Sigmoid focal loss, as mmdet.models.losses.FocalLoss (use_sigmoid=True).

    forward(pred, target, weight=None, avg_factor=None, reduction_override=None), where
    target is integer labels of the anchor shape (C and other values outside [0, C) are
    background) or a target of pred's shape (float, or a one-hot of any real dtype); weight
    of the anchor shape, pred's, or (N, 1) or (N * C,) for (N, C) pred. A 1-D pred with a
    target of its shape is one class per element (GroundingDINOHead). alpha=None (or
    negative) switches the alpha weighting off.
    """

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: float = 2.0,
        alpha: Optional[float] = 0.25,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(use_sigmoid, reduction, loss_weight, activated, backend)
        _checks.check_exponent(gamma, "gamma", "FocalLoss")
        _checks.check_alpha(alpha, "FocalLoss")
        self.gamma = gamma
        self.alpha = alpha

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        pred, target, was_vector = _as_one_class_rows(pred, target)
        options = self._options(_elementwise_weight(pred, weight), avg_factor, reduction_override)
        loss = functional.sigmoid_focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma, **options)
        return self.loss_weight * _as_vector(loss, was_vector)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, {self._common_repr()}"


class VarifocalLoss(_ClassificationLoss):
    """Varifocal loss (VFNet), as mmdet.models.losses.VarifocalLoss (use_sigmoid=True).

    forward(pred, target, weight=None, avg_factor=None, reduction_override=None), where
    target is a dense IoU-aware target of pred's shape (mmdetection) or a (label, score)
    pair as QualityFocalLoss takes it (RT-DETR, ultralytics). detach_weight=True is the
    form of the official RT-DETR, D-FINE and DEIM criteria; False differentiates the weight,
    as mmdetection and ultralytics (its RT-DETR port included, models/utils/loss.py) do.
    activated=True takes probabilities (PP-YOLOE).
    """

    def __init__(
        self,
        use_sigmoid: bool = True,
        alpha: float = 0.75,
        gamma: float = 2.0,
        iou_weighted: bool = True,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        detach_weight: bool = False,
        activated: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(use_sigmoid, reduction, loss_weight, activated, backend)
        name = "VarifocalLoss"
        _checks.check_finite(alpha, "alpha", name)
        _checks.check_exponent(gamma, "gamma", name)
        _checks.check_flag(iou_weighted, "iou_weighted", name)
        _checks.check_flag(detach_weight, "detach_weight", name)
        self.alpha = alpha
        self.gamma = gamma
        self.iou_weighted = iou_weighted
        self.detach_weight = detach_weight

    def forward(
        self,
        pred: Tensor,
        target: Union[Tensor, Tuple[Tensor, Tensor]],
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        pred, target, was_vector = _as_one_class_rows(pred, target)
        options = self._options(_elementwise_weight(pred, weight), avg_factor, reduction_override)
        loss = functional.varifocal_loss(
            pred,
            tuple(target) if isinstance(target, list) else target,
            alpha=self.alpha,
            gamma=self.gamma,
            iou_weighted=self.iou_weighted,
            detach_weight=self.detach_weight,
            **options,
        )
        return self.loss_weight * _as_vector(loss, was_vector)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
            f"detach_weight={self.detach_weight}, {self._common_repr()}"
        )


class DistributionFocalLoss(nn.Module):
    """Distribution Focal Loss (GFL), as mmdet.models.losses.DistributionFocalLoss.

    forward(pred, target, weight=None, avg_factor=None, reduction_override=None) with pred
    (M, n + 1) logits (or (..., n + 1)) and target (M) (pred.shape[:-1]) in [0, n]: n + 1 =
    reg_max + 1 bins, mmdetection's convention (ultralytics': DFLoss). validate: as
    distribution_focal_loss (None:
    a target outside [0, n] raises on CPU tensors, and is clamped without a device sync on
    CUDA; True: raises everywhere).
    """

    def __init__(
        self,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        validate: Optional[bool] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = "DistributionFocalLoss"
        _checks.check_module_reduction(reduction, name)
        _checks.check_loss_weight(loss_weight, name)
        _checks.check_validate(validate, name)
        _checks.check_backend_name(backend, name)
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.validate = validate
        self.backend = backend

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        loss = functional.distribution_focal_loss(
            pred,
            target,
            weight=weight,
            reduction=_reduction(self.reduction, reduction_override),
            avg_factor=avg_factor,
            validate=self.validate,
            backend=self.backend,
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}, backend={self.backend!r}"


class DFLoss(nn.Module):
    """Distribution Focal Loss with ultralytics' conventions, as ultralytics.utils.loss.DFLoss.

    num_bins is the number of bins (ultralytics calls it reg_max: 16 for YOLOv8, bins
    0..15), required, so that neither framework's meaning is assumed. forward(pred_dist,
    target): pred_dist (M, 4, num_bins) or (M * 4, num_bins) logits, target (M, 4) distances
    clamped into [0, num_bins - 1.01] as ultralytics does (without modifying target) ->
    (M, 1), the mean over the 4 sides. ultralytics' BboxLoss reads `reg_max` (= num_bins).
    """

    def __init__(self, num_bins: int, backend: str = "auto") -> None:
        super().__init__()
        _checks.check_count(num_bins, "num_bins", 2, "DFLoss")
        _checks.check_backend_name(backend, "DFLoss")
        self.num_bins = num_bins
        self.backend = backend

    @property
    def reg_max(self) -> int:
        """ultralytics' name for the number of bins."""
        return self.num_bins

    def forward(self, pred_dist: Tensor, target: Tensor) -> Tensor:
        _checks.require_tensor(target, "target", "DFLoss")
        if pred_dist.shape[-1] != self.num_bins:
            raise ValueError(
                f"DFLoss: the last dimension of pred_dist must hold num_bins = {self.num_bins} bins, "
                f"got shape {tuple(pred_dist.shape)}"
            )
        sides = pred_dist.view(*target.shape, self.num_bins) if pred_dist.dim() == 2 and target.dim() > 1 else pred_dist
        # ultralytics keeps the upper bin's weight above 0.01: target <= num_bins - 1 - 0.01.
        clamped = target.clamp(0, self.num_bins - 1 - 0.01)
        loss = functional.distribution_focal_loss(
            sides, clamped, reduction="none", validate=False, backend=self.backend
        )
        return loss.mean(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, backend={self.backend!r}"


class Integral(nn.Module):
    """GFL's distribution decode, as mmdet.models.dense_heads.gfl_head.Integral.

    forward(x): x (N, 4 * (reg_max + 1)) logits -> (N, 4) expected distances
    sum_k softmax(x)_k * k over reg_max + 1 bins (mmdetection's convention), differentiable.
    The `project` buffer (0..reg_max) is mmdetection's, kept so that its checkpoints load
    strictly; the kernels use the bin indices, which are its values.
    """

    def __init__(self, reg_max: int = 16, backend: str = "auto") -> None:
        super().__init__()
        _checks.check_count(reg_max, "reg_max", 1, "Integral")
        _checks.check_backend_name(backend, "Integral")
        self.reg_max = reg_max
        self.backend = backend
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, x: Tensor) -> Tensor:
        bins = self.reg_max + 1
        if x.shape[-1] % bins != 0:
            raise ValueError(
                f"Integral: the last dimension of x ({x.shape[-1]}) is not a multiple of reg_max + 1 = {bins}"
            )
        value = functional.distribution_integral(x.reshape(-1, bins), backend=self.backend)
        return value.reshape(-1, 4)

    def extra_repr(self) -> str:
        return f"reg_max={self.reg_max}, backend={self.backend!r}"
