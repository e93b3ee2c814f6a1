"""The Triton kernels of the gfl_ops operators: torch.ops.gfl_ops._<operator>_triton.

Everything but the launch is shared with the native kernels: the schemas and the autograd
kernel (csrc/gfl_registration.cpp, csrc/gfl_autograd.cpp), and the argument checks, the
outputs, the anchor layout and the modulation numbers, which each kernel below takes from its
operator's plan (torch.ops.gfl_ops._<operator>_plan, csrc/gfl_triton_plans.cpp: the native
kernels' host code), by name. The kernels then fill the plan's outputs with one launch of
kernels.py (plus, for reduction "sum", the sum of the programs' sums). They are registered
for CUDA tensors, and for CPU tensors under Triton's interpreter.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
from torch import Tensor

from .. import _registry
from . import kernels

# ---------------------------------------------------------------------------------------
# Launch configuration: one table, by row length. Short rows (C = 80 classes, 17 bins) are
# packed many to a program; about 2048 elements per program (1024 in float64), 4 warps.
# At 4096 elements (8 warps) the QFL and DFL kernels compiled to about 150 registers a
# thread for sm_90, one resident program per SM; at 2048, 96 to 155, three to five; float64
# at 2048 took all 255 and spilled to the stack (machine_code.py).
# ---------------------------------------------------------------------------------------

_ELEMENTS_PER_PROGRAM = 2048
_MAX_BLOCK_CLASSES = 128


def _elements_per_program(pred: Tensor) -> int:
    return _ELEMENTS_PER_PROGRAM // 2 if pred.dtype == torch.float64 else _ELEMENTS_PER_PROGRAM


def _class_blocks(num_classes: int, pred: Tensor, exponent_kind: int) -> Tuple[int, int]:
    """(anchors, classes) of a program's block. A general exponent's power is taken in
    float64 (kernels.power_of_magnitude): its float32 variants get float64's block, at 2048
    elements they took all 255 registers and spilled."""
    block_classes = min(triton.next_power_of_2(num_classes), _MAX_BLOCK_CLASSES)
    elements = _elements_per_program(pred)
    if exponent_kind == kernels.EXPONENT_GENERAL.value:
        elements = _ELEMENTS_PER_PROGRAM // 2
    return max(1, elements // block_classes), block_classes


def _bin_blocks(num_bins: int, pred: Tensor) -> Tuple[int, int]:
    block_bins = triton.next_power_of_2(num_bins)
    return max(1, _elements_per_program(pred) // block_bins), block_bins


def _num_warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4


def _acc_dtype(pred: Tensor):
    return triton.language.float64 if pred.dtype == torch.float64 else triton.language.float32


class _LossSink:
    """Where a loss kernel writes: the plan's per-anchor loss, or (reduction "sum") one sum
    per program, added up afterwards in a fixed order into the plan's 0-dim total."""

    def __init__(self, loss: Tensor, programs: int):
        self.total = loss if loss.dim() == 0 else None
        self.target = loss if self.total is None else loss.new_empty((programs,))

    def finish(self) -> None:
        if self.total is not None:
            torch.sum(self.target, dim=0, out=self.total)


# ---------------------------------------------------------------------------------------
# The classification losses: QFL, focal, varifocal
# ---------------------------------------------------------------------------------------

# The tensors of pred's shape whose strides a classification plan records.
_CLASS_PLAN_TENSORS = ("pred", "grad", "target", "element_weight", "element_loss")


def _strides(layout: Dict[str, List[int]], tensor: str) -> tuple:
    """(class stride, inner stride, outer strides) of one tensor of the plan; outer tuples
    have at least one entry (size 1, stride 0), which Triton needs."""
    class_stride, inner_stride, *outer_strides = layout[tensor]
    return class_stride, inner_stride, tuple(outer_strides) or (0,)


def launch_classification(
    layout: Dict[str, List[int]],
    modulation: Dict[str, float],
    loss: Tensor,
    grad: Tensor,
    pred: Tensor,
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    activated: bool,
    compute_grad: bool,
    label: Optional[Tensor] = None,
    score: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    **_,
) -> None:
    """One classification kernel launch from its plan (QFL, focal, varifocal): the layout and
    modulation numbers by name, and the operator's tensors. `target` is dense, or integer
    labels (focal's, varifocal's: then a label)."""
    if target is not None and not target.dtype.is_floating_point:
        label, target = target, None
    (num_anchors,), (num_classes,), (inner_size,) = layout["num_anchors"], layout["num_classes"], layout["inner_size"]
    outer_sizes = tuple(layout["outer_sizes"]) or (1,)
    exponent_kind = kernels.exponent_kind(modulation["exponent"])
    block_anchors, block_classes = _class_blocks(num_classes, pred, exponent_kind)
    programs = triton.cdiv(num_anchors, block_anchors)
    element_weight = weight is not None and weight.dim() == pred.dim()
    per_element = loss.dim() == pred.dim()
    sink = _LossSink(loss, programs)
    kernels.class_kernel[(programs,)](
        pred,
        grad if compute_grad else pred,
        sink.target,
        label.contiguous() if label is not None else sink.target,
        score.contiguous() if score is not None else sink.target,
        target if target is not None else pred,
        weight.contiguous() if weight is not None and not element_weight else sink.target,
        sink.target if class_weight is None else class_weight.contiguous(),
        weight if element_weight else sink.target,
        loss if per_element else sink.target,
        num_anchors,
        num_classes,
        inner_size,
        outer_sizes,
        *(stride for tensor in _CLASS_PLAN_TENSORS for stride in _strides(layout, tensor)),
        *(modulation[name] for name in ("exponent", "alpha_positive", "alpha_negative", "focal_base", "iou_weighted")),
        ACC_DTYPE=_acc_dtype(pred),
        MODULATION=int(modulation["modulation"]),
        EXPONENT=exponent_kind,
        WEIGHTS_POSITIVES=bool(modulation["weights_positives"]),
        DETACH_WEIGHT=bool(modulation["detach_weight"]),
        DENSE_TARGET=target is not None,
        HAS_SCORES=score is not None,
        HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_WEIGHT=weight is not None and not element_weight,
        HAS_ELEMENT_WEIGHT=element_weight,
        STORE_ELEMENT_LOSS=per_element,
        ACTIVATED=activated,
        NEED_GRAD=compute_grad,
        SUM=sink.total is not None,
        NUM_OUTER_DIMS=len(outer_sizes),
        BLOCK_ANCHORS=block_anchors,
        BLOCK_CLASSES=block_classes,
        num_warps=_num_warps(block_anchors * block_classes),
    )
    sink.finish()


# ---------------------------------------------------------------------------------------
# Distribution Focal Loss and the integral: rows of bins
# ---------------------------------------------------------------------------------------


def _bin_programs(layout: Dict[str, List[int]], pred: Tensor) -> int:
    """Programs of a launch over the plan's rows."""
    return triton.cdiv(layout["num_rows"][0], _bin_blocks(layout["num_bins"][0], pred)[0])


def _launch_bin_rows(
    kernel,
    layout: Dict[str, List[int]],
    pred: Tensor,
    grad: Tensor,
    outputs: List[Tensor],
    compute_grad: bool,
    **constants,
) -> None:
    (num_rows,), (num_bins,) = layout["num_rows"], layout["num_bins"]
    block_rows, block_bins = _bin_blocks(num_bins, pred)
    kernel[(_bin_programs(layout, pred),)](
        pred,
        grad if compute_grad else pred,
        *outputs,
        num_rows,
        num_bins,
        *layout["pred"],
        *layout["grad"],
        ACC_DTYPE=_acc_dtype(pred),
        NEED_GRAD=compute_grad,
        BLOCK_ROWS=block_rows,
        BLOCK_BINS=block_bins,
        num_warps=_num_warps(block_rows * block_bins),
        **constants,
    )


def launch_distribution_focal_loss(
    layout: Dict[str, List[int]],
    modulation: Dict[str, float],
    loss: Tensor,
    grad: Tensor,
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    compute_grad: bool,
    **_,
) -> None:
    sink = _LossSink(loss, _bin_programs(layout, pred))
    _launch_bin_rows(
        kernels.dfl_kernel,
        layout,
        pred,
        grad,
        [sink.target, target.contiguous(), sink.target if weight is None else weight.contiguous()],
        compute_grad,
        HAS_WEIGHT=weight is not None,
        SUM=sink.total is not None,
    )
    sink.finish()


def launch_distribution_integral(
    layout: Dict[str, List[int]],
    modulation: Dict[str, float],
    value: Tensor,
    grad: Tensor,
    pred: Tensor,
    grad_scale: Optional[Tensor],
    compute_grad: bool,
) -> None:
    scale = value if grad_scale is None else grad_scale.contiguous()
    _launch_bin_rows(
        kernels.integral_kernel,
        layout,
        pred,
        grad,
        [value, scale],
        compute_grad,
        HAS_GRAD_SCALE=grad_scale is not None,
    )


# The launches of _registry.Operator.triton_launch.
LAUNCHES = {
    "classification": launch_classification,
    "dfl": launch_distribution_focal_loss,
    "integral": launch_distribution_integral,
}


def kernel(operator: _registry.Operator):
    """torch.ops.gfl_ops._<operator>_triton: the operator's plan (the native host code: checks,
    outputs, layout, modulation), then its launch, which fills the plan's outputs."""
    plan = getattr(torch.ops.gfl_ops, operator.kernel_name("plan"))
    names = _registry.argument_names("gfl_ops", operator.kernel_name("plan"))
    launch = LAUNCHES[operator.triton_launch]

    def triton_kernel(*arguments) -> Tuple[Tensor, Tensor]:
        value, grad, layout, modulation = plan(*arguments)
        if layout:  # empty when there is nothing to launch: the outputs are complete
            launch(layout, modulation, value, grad, **dict(zip(names, arguments)))
        return value, grad

    return triton_kernel


def register(device_types: Tuple[str, ...]) -> None:
    """The Triton kernels as the implementations of torch.ops.gfl_ops._<operator>_triton."""
    for operator in _registry.OPERATORS.values():
        torch.library.register_kernel(f"gfl_ops::{operator.kernel_name('triton')}", device_types, kernel(operator))
