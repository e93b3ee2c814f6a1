"""DFL's cases: rows = 4 x positives (the four sides of a box), 16 or 17 bins (docs/MATH.md);
targets in [0, n - 0.1] as mmdetection clamps them, each row weighted by its anchor's score."""

from __future__ import annotations

import torch

from ... import functional, reference
from .. import peers
from ..cases import Case, Inputs, OpSpec

ROWS = (4096, 16384, 65536, 262144)
BINS = (16, 17)
SHAPES = tuple((rows, bins) for rows in ROWS for bins in BINS)
QUICK_SHAPES = ((16384, 17), (65536, 17))
CPU_SKIPPED_ROWS = (262144,)  # the CPU default leaves them out (--full runs them)
HALF_SHAPES = ((65536, 17),)  # --half: float16 and bfloat16 against float32
AVG_FACTOR = 4.0  # GFLHead: the 4 sides of a box, weighted by its score


def row_logits(case: Case, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """pred (M, n + 1): rows of bin logits, a leaf that requires grad."""
    pred = torch.randn(case.rows, case.classes, generator=generator)
    return pred.to(device=device, dtype=case.dtype).requires_grad_()


def _inputs(case: Case, generator: torch.Generator, device: torch.device) -> Inputs:
    pred = row_logits(case, generator, device)
    last_bin = case.classes - 1
    target = (torch.rand(case.rows, generator=generator) * (last_bin - 0.1)).to(device)
    weight = torch.rand(case.rows, generator=generator).to(device)  # the anchor's score, per side
    return Inputs(pred, (target,), dict(weight=weight, avg_factor=AVG_FACTOR))


SPEC = OpSpec(
    name="dfl",
    operator="distribution_focal_loss",
    public=functional.distribution_focal_loss,
    reference=reference.distribution_focal_loss,
    inputs=_inputs,
    target_bytes=lambda case: case.rows * 2 * torch.float32.itemsize,  # target, weight
    peers={"mmdet": lambda case, device: peers.mmdet_dfl},
    layouts=("rows",),
)
