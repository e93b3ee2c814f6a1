"""The focal family's cases: sigmoid focal loss with labels (RetinaNet, FCOS, ATSS: ~1%
positives, avg_factor the count of positives), as (N, C) and as a channel-first head
output, and varifocal loss against a dense IoU-aware target (VFNet, RT-DETR's form).

Peers: mmdetection's FocalLoss (CPU form) and torchvision's sigmoid_focal_loss for focal;
mmdetection's varifocal_loss and ultralytics' VarifocalLoss for varifocal.
"""

from __future__ import annotations

import math

import torch

from ... import functional, reference
from .. import peers
from ..cases import Case, Inputs, OpSpec
from .qfl import _label_score


def _focal_inputs(case: Case, generator: torch.Generator, device: torch.device) -> Inputs:
    label, _, num_positive = _label_score(case, generator)
    pred = torch.randn(*case.pred_shape, generator=generator).to(device=device, dtype=case.dtype).requires_grad_()
    options = dict(alpha=0.25, gamma=2.0, avg_factor=torch.tensor(float(num_positive), device=device))
    return Inputs(pred, (label.to(device),), options)


def _varifocal_inputs(case: Case, generator: torch.Generator, device: torch.device) -> Inputs:
    label, score, num_positive = _label_score(case, generator)
    logits = torch.randn(*case.pred_shape, generator=generator)
    target = reference.dense_target_from_labels(logits, label, score).to(device=device, dtype=case.dtype)
    pred = logits.to(device=device, dtype=case.dtype).requires_grad_()
    options = dict(alpha=0.75, gamma=2.0, avg_factor=torch.tensor(float(num_positive), device=device))
    return Inputs(pred, (target,), options)


FOCAL = OpSpec(
    name="focal",
    operator="sigmoid_focal_loss",
    public=functional.sigmoid_focal_loss,
    reference=reference.sigmoid_focal_loss,
    inputs=_focal_inputs,
    target_bytes=lambda case: math.prod(case.anchor_shape) * torch.int64.itemsize,  # the labels
    peers={
        "mmdet": lambda case, device: peers.mmdet_focal,
        "torchvision": lambda case, device: peers.torchvision_focal,
    },
)
VARIFOCAL = OpSpec(
    name="varifocal",
    operator="varifocal_loss",
    public=functional.varifocal_loss,
    reference=reference.varifocal_loss,
    inputs=_varifocal_inputs,
    target_bytes=lambda case: case.pred_bytes,  # a dense target in pred's dtype
    peers={
        "mmdet": lambda case, device: peers.mmdet_varifocal,
        "ultralytics": lambda case, device: peers.ultralytics_varifocal,
    },
    layouts=("nc",),
)
SPECS = (FOCAL, VARIFOCAL)
