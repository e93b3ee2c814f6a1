"""QFL's cases: on logits (qfl) and on probabilities (qfl_prob) with label / score targets,
and against a dense soft target (qfl_dense; qfl_dense_beta0 is YOLOv8's soft-target BCE,
qfl_dense_beta1.5 the pow-free half-integer), as (N, C) and as a channel-first head output.

Shapes from docs/MATH.md: anchors N (2 images of GFL at 800x1344, YOLOv8 batches) x 80 COCO
classes, and LVIS's 1203 classes at N = 8400.
"""

from __future__ import annotations

import math

import torch

from ... import functional, reference
from .. import peers
from ..cases import POSITIVE_FRACTION, BETA, Case, Inputs, OpSpec

ANCHORS = (8400, 44800, 134400, 358400, 537600)
CLASSES = 80
LVIS = (8400, 1203)
SHAPES = tuple((anchors, CLASSES) for anchors in ANCHORS) + (LVIS,)
QUICK_SHAPES = ((44800, 80), (134400, 80))
CPU_SKIPPED_ANCHORS = (358400, 537600)  # the CPU default leaves them out (--full runs them)
HALF_SHAPES = ((134400, 80),)  # --half: float16 and bfloat16 against float32


def _label_score(case: Case, generator: torch.Generator):
    """~1% positives with a random class (background = C elsewhere), and their IoU score,
    in pred's dtype as the decoded boxes it comes from."""
    num_anchors = math.prod(case.anchor_shape)
    num_positive = max(1, round(POSITIVE_FRACTION * num_anchors))
    label = torch.full((num_anchors,), case.classes, dtype=torch.long)
    positive = torch.randperm(num_anchors, generator=generator)[:num_positive]
    label[positive] = torch.randint(0, case.classes, (num_positive,), generator=generator)
    score = torch.rand(num_anchors, generator=generator).clamp_min(0.05)
    return label.view(case.anchor_shape), score.view(case.anchor_shape).to(case.dtype), num_positive


# The dense-target cases at other betas: YOLOv8's soft-target BCE (beta = 0) and 1.5.
DENSE_BETAS = {"qfl_dense": BETA, "qfl_dense_beta0": 0.0, "qfl_dense_beta1.5": 1.5}


def _inputs(case: Case, generator: torch.Generator, device: torch.device) -> Inputs:
    """avg_factor = the count of positives as a 0-dim tensor, as the heads pass it."""
    label, score, num_positive = _label_score(case, generator)
    logits = torch.randn(*case.pred_shape, generator=generator)
    pred = torch.sigmoid(logits) if case.op == "qfl_prob" else logits
    pred = pred.to(device=device, dtype=case.dtype).requires_grad_()
    options = dict(beta=DENSE_BETAS.get(case.op, BETA), avg_factor=torch.tensor(float(num_positive), device=device))
    if case.op in DENSE_BETAS:
        target = reference.dense_target_from_labels(logits, label, score)
        return Inputs(pred, (target.to(device=device, dtype=case.dtype),), options)
    options["activated"] = case.op == "qfl_prob"
    return Inputs(pred, (label.to(device), score.to(device)), options)


def _label_score_bytes(case: Case) -> int:
    return math.prod(case.anchor_shape) * (torch.int64.itemsize + torch.float32.itemsize)


def _label_score_spec(name: str) -> OpSpec:
    return OpSpec(
        name=name,
        operator="quality_focal_loss",
        public=functional.quality_focal_loss,
        reference=reference.quality_focal_loss,
        inputs=_inputs,
        target_bytes=_label_score_bytes,
        peers={"mmdet": lambda case, device: peers.mmdet_qfl},
    )


QFL = _label_score_spec("qfl")
QFL_PROB = _label_score_spec("qfl_prob")


def _dense_spec(name: str) -> OpSpec:
    return OpSpec(
        name=name,
        operator="quality_focal_loss_dense",
        public=functional.quality_focal_loss_dense,
        reference=reference.quality_focal_loss_dense,
        inputs=_inputs,
        target_bytes=lambda case: case.pred_bytes,  # a dense target in pred's dtype
        peers={"mmdet": lambda case, device: peers.mmdet_qfl_dense},
        layouts=("nc",),  # a dense target comes from the assigner as (N, C)
    )


QFL_DENSE = _dense_spec("qfl_dense")
SPECS = (QFL, QFL_PROB, QFL_DENSE) + tuple(_dense_spec(name) for name in DENSE_BETAS if name != "qfl_dense")
