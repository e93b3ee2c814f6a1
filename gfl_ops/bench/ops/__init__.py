"""The ops the benchmark measures, one module per family (qfl.py, family.py, dfl.py, integral.py),
and what the harness does with any of them: build its cases, its inputs, its byte model."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..cases import CHANNEL_FIRST_BATCH, LAYOUTS, Case, Inputs, OpSpec
from . import dfl, family, integral, qfl

OP_SPECS: Dict[str, OpSpec] = {spec.name: spec for spec in (*qfl.SPECS, *family.SPECS, dfl.SPEC, integral.SPEC)}
OPS = tuple(OP_SPECS)
ROW_OPS = tuple(name for name, spec in OP_SPECS.items() if spec.layouts == ("rows",))  # DFL's shapes


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Realistic inputs of the case's op (see its module), drawn from a seeded generator."""
    if case.op not in OP_SPECS:
        raise ValueError(f"unknown op {case.op!r}; ops: {OPS}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return OP_SPECS[case.op].inputs(case, generator, device)


def bytes_moved(case: Case, mode: str) -> int:
    """Bytes read and written by an ideal implementation of one step.

    forward: read pred and the targets (and write the integral's output);
    full:    the forward, then read pred again and write its gradient (the 3-pass floor of
             docs/MATH.md; the integral also reads its output's gradient).
    Scalar losses and per-row temporaries that need not reach memory are not counted.
    """
    spec = OP_SPECS[case.op]
    forward = case.pred_bytes + spec.target_bytes(case)
    if mode == "forward":
        return forward
    return forward + 2 * case.pred_bytes + spec.backward_bytes(case)


def build_cases(
    ops: Sequence[str],
    dtypes: Sequence[torch.dtype],
    qfl_shapes: Sequence[Tuple[int, int]],
    dfl_shapes: Sequence[Tuple[int, int]],
    layouts: Sequence[str] = LAYOUTS,
    channel_first_ops: Sequence[str] = ("qfl", "qfl_prob", "focal"),
) -> List[Case]:
    """qfl / qfl_prob in each of `layouts` (channel-first only for channel_first_ops),
    qfl_dense in (N, C) only (a dense target comes from the assigner as (N, C)), dfl and
    integral as rows of bins. The dtypes of one shape come one after the other, so that
    a row's fp32_ratio compares runs close in time."""
    shapes = []
    for op in ops:
        if op in ROW_OPS:
            shapes += [(op, rows, bins, "rows") for rows, bins in dfl_shapes]
            continue
        for anchors, classes in qfl_shapes:
            shapes += [
                (op, anchors, classes, layout)
                for layout in layouts
                if layout in OP_SPECS[op].layouts
                and (layout == "nc" or (op in channel_first_ops and anchors % CHANNEL_FIRST_BATCH == 0))
            ]
    return [Case(*shape, dtype) for shape in shapes for dtype in dtypes]
