"""The Triton kernels of the gfl_ops operators: torch.ops.gfl_ops._<operator>_triton.

Everything but the launch is shared with the native kernels: the schemas and the autograd
kernel (csrc/gfl_ops.cpp), and the argument checks, the outputs and the anchor layout,
which each kernel below takes from its operator's plan (torch.ops.gfl_ops._<operator>_plan,
csrc/gfl_plans.cpp: the native kernels' host code). The kernels then fill the plan's
outputs with one launch of kernels.py (plus, for reduction "sum", the sum of the programs'
sums). They are registered for CUDA tensors, and for CPU tensors under Triton's interpreter.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor

from . import kernels

# ---------------------------------------------------------------------------------------
# Launch configuration: one table, by row length. Short rows (C = 80 classes, 17 bins) are
# packed many to a program; about 4096 elements per program.
# ---------------------------------------------------------------------------------------

_ELEMENTS_PER_PROGRAM = 4096
_MAX_BLOCK_CLASSES = 128


def _qfl_blocks(num_classes: int) -> Tuple[int, int]:
    block_classes = min(triton.next_power_of_2(num_classes), _MAX_BLOCK_CLASSES)
    return max(1, _ELEMENTS_PER_PROGRAM // block_classes), block_classes


def _bin_blocks(num_bins: int) -> Tuple[int, int]:
    block_bins = triton.next_power_of_2(num_bins)
    return max(1, _ELEMENTS_PER_PROGRAM // block_bins), block_bins


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
# Quality Focal Loss
# ---------------------------------------------------------------------------------------


def _qfl_layout(plan: Sequence[int]):
    """The QFL plan's numbers (csrc/gfl_plans.cpp) as the kernel's arguments: the anchor
    layout, then (class stride, inner stride, outer strides) of pred, grad and target. Outer
    tuples have at least one entry (size 1, stride 0), which Triton needs."""
    num_anchors, num_classes, inner_size, num_outer = plan[:4]
    outer_sizes = tuple(plan[4:4 + num_outer]) or (1,)
    strides = []
    position = 4 + num_outer
    for _ in range(3):
        outer_strides = tuple(plan[position + 2:position + 2 + num_outer]) or (0,)
        strides.extend([plan[position], plan[position + 1], outer_strides])
        position += 2 + num_outer
    return num_anchors, num_classes, inner_size, outer_sizes, strides


def _launch_qfl(plan: Sequence[int], pred: Tensor, grad: Tensor, loss: Tensor, label: Tensor, score: Tensor,
                target: Tensor, weight: Optional[Tensor], beta: float, activated: bool, compute_grad: bool) -> None:
    num_anchors, num_classes, inner_size, outer_sizes, strides = _qfl_layout(plan)
    block_anchors, block_classes = _qfl_blocks(num_classes)
    programs = triton.cdiv(num_anchors, block_anchors)
    sink = _LossSink(loss, programs)
    kernels.qfl_kernel[(programs,)](
        pred, grad if compute_grad else pred, sink.target, label, score, target,
        sink.target if weight is None else weight.contiguous(),
        num_anchors, num_classes, inner_size, outer_sizes, *strides, float(beta),
        ACC_DTYPE=_acc_dtype(pred), DENSE_TARGET=target is not pred, HAS_WEIGHT=weight is not None,
        ACTIVATED=activated, BETA_IS_TWO=float(beta) == 2.0, NEED_GRAD=compute_grad, SUM=sink.total is not None,
        NUM_OUTER_DIMS=len(outer_sizes), BLOCK_ANCHORS=block_anchors, BLOCK_CLASSES=block_classes,
        num_warps=_num_warps(block_anchors * block_classes),
    )
    sink.finish()


def quality_focal_loss(pred: Tensor, label: Tensor, score: Tensor, weight: Optional[Tensor], beta: float,
                       activated: bool, reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._quality_focal_loss_plan(
        pred, label, score, weight, beta, activated, reduction, compute_grad
    )
    if plan:
        _launch_qfl(plan, pred, grad, loss, label.contiguous(), score.contiguous(), pred, weight, beta, activated,
                    compute_grad)
    return loss, grad


def quality_focal_loss_dense(pred: Tensor, target: Tensor, weight: Optional[Tensor], beta: float, activated: bool,
                             reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._quality_focal_loss_dense_plan(
        pred, target, weight, beta, activated, reduction, compute_grad
    )
    if plan:
        _launch_qfl(plan, pred, grad, loss, loss, loss, target, weight, beta, activated, compute_grad)
    return loss, grad


# ---------------------------------------------------------------------------------------
# Distribution Focal Loss and the integral: rows of bins
# ---------------------------------------------------------------------------------------


def _bin_programs(plan: Sequence[int]) -> int:
    """Programs of a launch over the plan's rows (plan[0] rows of plan[1] bins)."""
    return triton.cdiv(plan[0], _bin_blocks(plan[1])[0])


def _launch_bin_rows(kernel, plan: Sequence[int], pred: Tensor, grad: Tensor, outputs: List[Tensor],
                     compute_grad: bool, **constants) -> None:
    num_rows, num_bins, pred_row_stride, pred_bin_stride, grad_row_stride, grad_bin_stride = plan
    block_rows, block_bins = _bin_blocks(num_bins)
    kernel[(_bin_programs(plan),)](
        pred, grad if compute_grad else pred, *outputs,
        num_rows, num_bins, pred_row_stride, pred_bin_stride, grad_row_stride, grad_bin_stride,
        ACC_DTYPE=_acc_dtype(pred), NEED_GRAD=compute_grad, BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        num_warps=_num_warps(block_rows * block_bins), **constants,
    )


def distribution_focal_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                            compute_grad: bool) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._distribution_focal_loss_plan(pred, target, weight, reduction, compute_grad)
    if plan:
        sink = _LossSink(loss, _bin_programs(plan))
        _launch_bin_rows(
            kernels.dfl_kernel, plan, pred, grad,
            [sink.target, target.contiguous(), sink.target if weight is None else weight.contiguous()],
            compute_grad, HAS_WEIGHT=weight is not None, SUM=sink.total is not None,
        )
        sink.finish()
    return loss, grad


def distribution_integral(pred: Tensor, grad_scale: Optional[Tensor], compute_grad: bool) -> Tuple[Tensor, Tensor]:
    value, grad, plan = torch.ops.gfl_ops._distribution_integral_plan(pred, grad_scale, compute_grad)
    if plan:
        scale = value if grad_scale is None else grad_scale.contiguous()
        _launch_bin_rows(kernels.integral_kernel, plan, pred, grad, [value, scale], compute_grad,
                         HAS_GRAD_SCALE=grad_scale is not None)
    return value, grad


KERNELS = {
    "quality_focal_loss": quality_focal_loss,
    "quality_focal_loss_dense": quality_focal_loss_dense,
    "distribution_focal_loss": distribution_focal_loss,
    "distribution_integral": distribution_integral,
}


def register(device_types: Tuple[str, ...]) -> None:
    """The kernels above as the implementations of torch.ops.gfl_ops._<operator>_triton."""
    for name, kernel in KERNELS.items():
        torch.library.register_kernel(f"gfl_ops::_{name}_triton", device_types, kernel)
