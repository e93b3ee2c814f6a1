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

# The tensors of pred's shape whose strides a classification plan records, in its order.
_CLASS_PLAN_TENSORS = ("pred", "grad", "target", "element_weight", "element_loss")


def _class_layout(plan: Sequence[int]):
    """The classification plan's numbers (csrc/gfl_plans.cpp) as the kernel's arguments: the
    anchor layout, then (class stride, inner stride, outer strides) of each of
    _CLASS_PLAN_TENSORS. Outer tuples have at least one entry (size 1, stride 0), which
    Triton needs."""
    num_anchors, num_classes, inner_size, num_outer = plan[:4]
    outer_sizes = tuple(plan[4 : 4 + num_outer]) or (1,)
    strides = []
    position = 4 + num_outer
    for _ in _CLASS_PLAN_TENSORS:
        outer_strides = tuple(plan[position + 2 : position + 2 + num_outer]) or (0,)
        strides.extend([plan[position], plan[position + 1], outer_strides])
        position += 2 + num_outer
    return num_anchors, num_classes, inner_size, outer_sizes, strides


class _ClassLaunch:
    """One classification kernel call: its modulation and numbers, gfl_math.h's
    ModulationParams as csrc/gfl_host.h's quality_params, focal_params and varifocal_params
    make them."""

    def __init__(
        self,
        modulation,
        exponent: float,
        alpha_positive: float = 1.0,
        alpha_negative: float = 1.0,
        focal_base: bool = False,
        weights_positives: bool = False,
        iou_weighted: bool = False,
        detach_weight: bool = False,
    ):
        self.modulation = modulation
        self.numbers = (
            float(exponent),
            float(alpha_positive),
            float(alpha_negative),
            float(focal_base),
            float(iou_weighted),
        )
        self.exponent_kind = kernels.exponent_kind(exponent)
        self.weights_positives = bool(weights_positives)
        self.detach_weight = bool(detach_weight)

    def __call__(
        self,
        plan: Sequence[int],
        pred: Tensor,
        grad: Tensor,
        loss: Tensor,
        label: Optional[Tensor],
        score: Optional[Tensor],
        target: Optional[Tensor],
        weight: Optional[Tensor],
        class_weight: Optional[Tensor],
        activated: bool,
        compute_grad: bool,
    ) -> None:
        num_anchors, num_classes, inner_size, outer_sizes, strides = _class_layout(plan)
        block_anchors, block_classes = _class_blocks(num_classes, pred, self.exponent_kind)
        programs = triton.cdiv(num_anchors, block_anchors)
        element_weight = weight is not None and weight.dim() == pred.dim()
        per_element = loss.dim() == pred.dim()
        sink = _LossSink(loss, programs)
        kernels.class_kernel[(programs,)](
            pred,
            grad if compute_grad else pred,
            sink.target,
            label if label is not None else sink.target,
            score if score is not None else sink.target,
            target if target is not None else pred,
            weight.contiguous() if weight is not None and not element_weight else sink.target,
            sink.target if class_weight is None else class_weight.contiguous(),
            weight if element_weight else sink.target,
            loss if per_element else sink.target,
            num_anchors,
            num_classes,
            inner_size,
            outer_sizes,
            *strides,
            *self.numbers,
            ACC_DTYPE=_acc_dtype(pred),
            MODULATION=self.modulation,
            EXPONENT=self.exponent_kind,
            WEIGHTS_POSITIVES=self.weights_positives,
            DETACH_WEIGHT=self.detach_weight,
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


def quality_focal_loss(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    beta: float,
    activated: bool,
    reduction: str,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._quality_focal_loss_plan(
        pred, label, score, weight, class_weight, beta, activated, reduction, compute_grad
    )
    if plan:
        _ClassLaunch(kernels.QUALITY, beta)(
            plan,
            pred,
            grad,
            loss,
            label.contiguous(),
            score.contiguous(),
            None,
            weight,
            class_weight,
            activated,
            compute_grad,
        )
    return loss, grad


def quality_focal_loss_dense(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    beta: float,
    activated: bool,
    reduction: str,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._quality_focal_loss_dense_plan(
        pred, target, weight, class_weight, beta, activated, reduction, compute_grad
    )
    if plan:
        _ClassLaunch(kernels.QUALITY, beta)(
            plan, pred, grad, loss, None, None, target, weight, class_weight, activated, compute_grad
        )
    return loss, grad


def _labels_or_dense(target: Tensor, score: Optional[Tensor]):
    """(label, score, dense target) of a focal or varifocal target: integer labels (with a
    score, or alone: focal's, a score of 1) or a dense float tensor."""
    if target.dtype.is_floating_point:
        return None, None, target
    return target.contiguous(), None if score is None else score.contiguous(), None


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    alpha: float,
    gamma: float,
    activated: bool,
    reduction: str,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._sigmoid_focal_loss_plan(
        pred, target, weight, class_weight, alpha, gamma, activated, reduction, compute_grad
    )
    if plan:
        # alpha_t = alpha t + (1 - alpha)(1 - t), or 1 for alpha < 0 (gfl_host.h's focal_params).
        alphas = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
        launch = _ClassLaunch(kernels.FOCAL_FAMILY, gamma, *alphas, focal_base=True)
        launch(plan, pred, grad, loss, *_labels_or_dense(target, None), weight, class_weight, activated, compute_grad)
    return loss, grad


def varifocal_loss(
    pred: Tensor,
    target: Tensor,
    score: Optional[Tensor],
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    alpha: float,
    gamma: float,
    iou_weighted: bool,
    detach_weight: bool,
    activated: bool,
    reduction: str,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._varifocal_loss_plan(
        pred,
        target,
        score,
        weight,
        class_weight,
        alpha,
        gamma,
        iou_weighted,
        detach_weight,
        activated,
        reduction,
        compute_grad,
    )
    if plan:
        launch = _ClassLaunch(
            kernels.FOCAL_FAMILY,
            gamma,
            alpha,
            alpha,
            weights_positives=True,
            iou_weighted=iou_weighted,
            detach_weight=detach_weight,
        )
        launch(plan, pred, grad, loss, *_labels_or_dense(target, score), weight, class_weight, activated, compute_grad)
    return loss, grad


# ---------------------------------------------------------------------------------------
# Distribution Focal Loss and the integral: rows of bins
# ---------------------------------------------------------------------------------------


def _bin_programs(plan: Sequence[int], pred: Tensor) -> int:
    """Programs of a launch over the plan's rows (plan[0] rows of plan[1] bins)."""
    return triton.cdiv(plan[0], _bin_blocks(plan[1], pred)[0])


def _launch_bin_rows(
    kernel, plan: Sequence[int], pred: Tensor, grad: Tensor, outputs: List[Tensor], compute_grad: bool, **constants
) -> None:
    num_rows, num_bins, pred_row_stride, pred_bin_stride, grad_row_stride, grad_bin_stride = plan
    block_rows, block_bins = _bin_blocks(num_bins, pred)
    kernel[(_bin_programs(plan, pred),)](
        pred,
        grad if compute_grad else pred,
        *outputs,
        num_rows,
        num_bins,
        pred_row_stride,
        pred_bin_stride,
        grad_row_stride,
        grad_bin_stride,
        ACC_DTYPE=_acc_dtype(pred),
        NEED_GRAD=compute_grad,
        BLOCK_ROWS=block_rows,
        BLOCK_BINS=block_bins,
        num_warps=_num_warps(block_rows * block_bins),
        **constants,
    )


def distribution_focal_loss(
    pred: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str, compute_grad: bool
) -> Tuple[Tensor, Tensor]:
    loss, grad, plan = torch.ops.gfl_ops._distribution_focal_loss_plan(pred, target, weight, reduction, compute_grad)
    if plan:
        sink = _LossSink(loss, _bin_programs(plan, pred))
        _launch_bin_rows(
            kernels.dfl_kernel,
            plan,
            pred,
            grad,
            [sink.target, target.contiguous(), sink.target if weight is None else weight.contiguous()],
            compute_grad,
            HAS_WEIGHT=weight is not None,
            SUM=sink.total is not None,
        )
        sink.finish()
    return loss, grad


def distribution_integral(pred: Tensor, grad_scale: Optional[Tensor], compute_grad: bool) -> Tuple[Tensor, Tensor]:
    value, grad, plan = torch.ops.gfl_ops._distribution_integral_plan(pred, grad_scale, compute_grad)
    if plan:
        scale = value if grad_scale is None else grad_scale.contiguous()
        _launch_bin_rows(
            kernels.integral_kernel,
            plan,
            pred,
            grad,
            [value, scale],
            compute_grad,
            HAS_GRAD_SCALE=grad_scale is not None,
        )
    return value, grad


KERNELS = {
    "quality_focal_loss": quality_focal_loss,
    "quality_focal_loss_dense": quality_focal_loss_dense,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "varifocal_loss": varifocal_loss,
    "distribution_focal_loss": distribution_focal_loss,
    "distribution_integral": distribution_integral,
}


def register(device_types: Tuple[str, ...]) -> None:
    """The kernels above as the implementations of torch.ops.gfl_ops._<operator>_triton."""
    for name, kernel in KERNELS.items():
        torch.library.register_kernel(f"gfl_ops::_{name}_triton", device_types, kernel)
