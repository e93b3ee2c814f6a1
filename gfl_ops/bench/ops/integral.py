"""The distribution integral's cases: DFL's rows of bins (ops/dfl.py's shapes); E is one
value per row, so the backward is driven by a random incoming gradient."""

from __future__ import annotations

import torch

from ... import functional, reference
from .. import peers
from ..cases import Case, Inputs, OpSpec
from .dfl import row_logits


def _inputs(case: Case, generator: torch.Generator, device: torch.device) -> Inputs:
    pred = row_logits(case, generator, device)
    grad_out = torch.randn(case.rows, generator=generator).to(device=device, dtype=case.dtype)
    return Inputs(pred, (), {}, grad_out=grad_out)


SPEC = OpSpec(
    name="integral",
    operator="distribution_integral",
    public=functional.distribution_integral,
    reference=reference.distribution_integral,
    inputs=_inputs,
    target_bytes=lambda case: case.rows * case.dtype.itemsize,  # writes E
    peers={"mmdet": lambda case, device: peers.mmdet_integral(case.classes, device)},
    layouts=("rows",),
    backward_bytes=lambda case: case.rows * case.dtype.itemsize,  # reads dE
)
