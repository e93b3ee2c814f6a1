"""What the numbers should show, per device type, and the verdicts printed under the table
(informational: printed, never asserted).

HEADLINE_TARGETS[device type]: (op, mode, shape, layout, dtype) -> targets. A provider's
name: native's minimum speedup over it. PEAK_OVER_PRED: native's largest peak extra memory
over pred's size. PEAK_VS_REFERENCE: the smallest ratio of the eager reference's peak to
native's. COPY_FRACTION: native's smallest share of a same-size copy's bandwidth
(bytes_moved). FP32_RATIO: native's largest median over its float32 step of the same
shape in the same run (the row's fp32_ratio).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .ops import dfl, qfl

PEAK_OVER_PRED = "peak over pred"
PEAK_VS_REFERENCE = "peak vs reference"
COPY_FRACTION = "copy fraction"
FP32_RATIO = "fp32 ratio"
HALF_DTYPES = ("fp16", "bf16")

_CPU_TARGETS = {  # the foundation issue, on the 2-core development machine
    ("qfl", "full", (44800, 80), "nc", "fp32"): {"mmdet": 5.0, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("qfl", "full", (134400, 80), "nc", "fp32"): {"mmdet": 5.0, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("dfl", "full", (16384, 17), "rows", "fp32"): {"mmdet": 2.5, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("dfl", "full", (65536, 17), "rows", "fp32"): {"mmdet": 2.5, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    # The focal-family issue: 5x the eager peers, 1.5x torch.compile, one buffer of pred's size.
    **{
        ("focal", "full", (anchors, 80), "nc", "fp32"): {
            "mmdet": 5.0,
            "torchvision": 5.0,
            "compile": 1.5,
            PEAK_OVER_PRED: 1.0,
        }
        for anchors in (44800, 134400)
    },
    **{
        ("varifocal", "full", (anchors, 80), "nc", "fp32"): {
            "mmdet": 5.0,
            "ultralytics": 5.0,
            "compile": 1.5,
            PEAK_OVER_PRED: 1.0,
        }
        for anchors in (44800, 134400)
    },
    # The half-precision issue: a float16 or bfloat16 full step within 1.5x of float32's.
    **{("qfl", "full", shape, "nc", dtype): {FP32_RATIO: 1.5} for shape in qfl.HALF_SHAPES for dtype in HALF_DTYPES},
    **{("dfl", "full", shape, "rows", dtype): {FP32_RATIO: 1.5} for shape in dfl.HALF_SHAPES for dtype in HALF_DTYPES},
}
_CUDA_QFL_TARGETS = {"reference": 10.0, "compile": 1.3, COPY_FRACTION: 0.75, PEAK_VS_REFERENCE: 5.0}
_CUDA_DFL_TARGETS = {"reference": 5.0, PEAK_VS_REFERENCE: 5.0}
_CUDA_TARGETS = {  # the CUDA issue
    **{
        ("qfl", "full", (anchors, 80), "nc", dtype): _CUDA_QFL_TARGETS
        for anchors in (134400, 537600)
        for dtype in ("fp32", "bf16")
    },
    **{
        ("dfl", "full", (rows, 17), "rows", dtype): _CUDA_DFL_TARGETS
        for rows in (65536, 262144)
        for dtype in ("fp32", "bf16")
    },
}
HEADLINE_TARGETS = {"cpu": _CPU_TARGETS, "cuda": _CUDA_TARGETS}

# Upper bounds, and the slack each allows: "one buffer of pred's size" admits the 0-dim
# outputs (the loss, its mean: tens of bytes), which are no buffer, hence 0.1%.
_AT_MOST = {PEAK_OVER_PRED: 1.001, FP32_RATIO: 1.0}


def _measured(found: Dict[str, dict], name: str) -> Optional[Tuple[float, str]]:
    """A target's measured value and its description, or None where this run lacks it."""
    native = found["native"]
    if name == PEAK_OVER_PRED:
        over = native["peak_extra_over_pred"]
        return None if over is None else (over, f"peak {over:.2f}x pred")
    if name == PEAK_VS_REFERENCE:
        reference = found.get("reference", {}).get("peak_extra_bytes")
        if not reference or not native["peak_extra_bytes"]:
            return None
        ratio = reference / native["peak_extra_bytes"]
        return ratio, f"peak {ratio:.1f}x below reference"
    if name == COPY_FRACTION:
        fraction = native["bandwidth_fraction"]
        return fraction, f"{fraction:.0%} of copy bandwidth"
    if name == FP32_RATIO:
        ratio = native.get("fp32_ratio")
        return None if ratio is None else (ratio, f"{ratio:.2f}x its fp32 step")
    if name not in found:
        return None
    speedup = found[name]["native_speedup"]
    return speedup, f"{speedup:.2f}x {name}"


def _target_verdicts(found: Dict[str, dict], targets: dict) -> List[str]:
    """'<measured> (target <bound>: met|MISSED)' for each target this run measured."""
    parts = []
    for name, bound in targets.items():
        measured = _measured(found, name)
        if measured is None:
            continue
        value, text = measured
        if name in _AT_MOST:
            met, bound_text = value <= bound * _AT_MOST[name], f"<= {bound:g}x"
        elif name == COPY_FRACTION:
            met, bound_text = value >= bound, f">= {bound:.0%}"
        else:
            met, bound_text = value >= bound, f">= {bound:g}x"
        parts.append(f"{text} (target {bound_text}: {'met' if met else 'MISSED'})")
    return parts


def format_headlines(rows: List[dict], device_type: str = "cpu") -> str:
    """The targets of HEADLINE_TARGETS[device_type] that this run measured, met or not."""
    lines = []
    for (op, mode, shape, layout, dtype), targets in HEADLINE_TARGETS.get(device_type, {}).items():
        found = {
            row["provider"]: row
            for row in rows
            if (row["op"], row["mode"], row["layout"], row["dtype"]) == (op, mode, layout, dtype)
            and tuple(row["shape"]) == shape
            and not row.get("error")
        }
        verdicts = _target_verdicts(found, targets) if "native" in found else []
        if verdicts:
            label = "x".join(map(str, shape))
            lines.append(f"  {op} {mode} {label} {layout} {dtype}: native " + ", ".join(verdicts))
    return "Headline targets (informational):\n" + "\n".join(lines) if lines else ""
