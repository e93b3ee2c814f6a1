"""torch.ops.gfl_ops.*_triton: the Triton kernels as registered operators.

Same schemas and contract as the native operators (gfl_ops/_ops.py): each returns the
loss (per anchor, or summed) and, when compute_grad, d loss / d pred from the same pass. They are
torch.library.triton_op's, so torch.compile traces into the kernels, and they share the
native operators' autograd formula.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _ops
from . import kernels

def _acc_dtype(pred: Tensor):
    return triton.language.float64 if pred.dtype == torch.float64 else triton.language.float32


def _check(condition: bool, message: str) -> None:
    torch._check(condition, lambda: f"gfl_ops (triton): {message}")


def _check_pred(pred: Tensor, min_dim: int) -> None:
    _check(pred.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64), f"pred dtype {pred.dtype}")
    _check(pred.dim() >= min_dim and pred.shape[1] > 0, f"pred shape {tuple(pred.shape)}")


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


# ---------------------------------------------------------------------------------------
# Anchor layout: the kernels address anchors as (outer, inner) pairs with one stride each.
# ---------------------------------------------------------------------------------------


def _coalesce_anchor_dims(tensors: List[Tensor]) -> List[Tuple[int, List[int]]]:
    """Merges pred's anchor dimensions (all but dim 1) where they merge in every tensor.

    Returns (size, strides per tensor) groups, innermost first.
    """
    pred = tensors[0]
    groups: List[Tuple[int, List[int]]] = []
    for dim in reversed([0] + list(range(2, pred.dim()))):
        size = pred.shape[dim]
        if size == 1:
            continue
        strides = [t.stride(dim) for t in tensors]
        if groups and all(s == gs * groups[-1][0] for s, gs in zip(strides, groups[-1][1])):
            groups[-1] = (groups[-1][0] * size, groups[-1][1])
        else:
            groups.append((size, strides))
    return groups or [(1, [0] * len(tensors))]


def _anchor_layout(tensors: List[Tensor]):
    """(inner_size, [(outer_stride, inner_stride, class_stride) per tensor]), or None when the
    anchor dimensions do not reduce to two (a spatially sliced map, say)."""
    groups = _coalesce_anchor_dims(tensors)
    if len(groups) > 2:
        return None
    inner_size, inner_strides = groups[0]
    outer_strides = groups[1][1] if len(groups) == 2 else [0] * len(tensors)
    return inner_size, [(o, i, t.stride(1)) for o, i, t in zip(outer_strides, inner_strides, tensors)]


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """The operator's loss output: per anchor, or (reduction "sum") their sum. torch.sum adds
    up in a fixed order on the GPU, so the result has the same bits run after run."""
    _check(reduction in _ops.KERNEL_REDUCTIONS, f"reduction must be one of {_ops.KERNEL_REDUCTIONS}, got {reduction!r}")
    return loss.sum() if reduction == "sum" else loss


def _check_weight(pred: Tensor, weight: Optional[Tensor], shape: tuple) -> Optional[Tensor]:
    """The weight, checked and contiguous, or None."""
    if weight is None:
        return None
    _ops.check_same_device(pred, weight)
    _check(tuple(weight.shape) == tuple(shape) and weight.dtype == _ops.accumulate_dtype(pred.dtype),
           f"weight must have the loss's shape {tuple(shape)} and dtype {_ops.accumulate_dtype(pred.dtype)}")
    return weight.contiguous()


def _launch_qfl(pred: Tensor, grad: Tensor, loss: Tensor, label: Tensor, score: Tensor, target: Tensor,
                weight: Optional[Tensor], beta: float, activated: bool, compute_grad: bool,
                dense_target: bool) -> None:
    num_anchors = loss.numel()
    if num_anchors == 0:
        return
    grad_like = grad if compute_grad else pred
    layout = _anchor_layout([pred, grad_like, target])
    _check(layout is not None, "pred's anchor dimensions must reduce to two strided dimensions; "
           "pass pred.contiguous() for this layout")
    inner_size, ((po, pi, pc), (go, gi, gc), (to, ti, tc)) = layout
    block_anchors, block_classes = _qfl_blocks(pred.shape[1])
    grid = (triton.cdiv(num_anchors, block_anchors),)
    wrap_triton(kernels.qfl_kernel)[grid](
        pred, grad if compute_grad else pred, loss, label, score, target, loss if weight is None else weight,
        num_anchors, pred.shape[1], inner_size,
        po, pi, pc, go, gi, gc, to, ti, tc,
        float(beta),
        ACC_DTYPE=_acc_dtype(pred), DENSE_TARGET=dense_target, HAS_WEIGHT=weight is not None, ACTIVATED=activated,
        BETA_IS_TWO=float(beta) == 2.0, NEED_GRAD=compute_grad,
        BLOCK_ANCHORS=block_anchors, BLOCK_CLASSES=block_classes,
        num_warps=_num_warps(block_anchors * block_classes),
    )


@triton_op("gfl_ops::quality_focal_loss_triton", mutates_args=())
def quality_focal_loss_triton(pred: Tensor, label: Tensor, score: Tensor, weight: Optional[Tensor], beta: float,
                              activated: bool, reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    _check_pred(pred, 2)
    _ops.check_same_device(pred, label, score)
    anchor_shape = _ops.anchor_shape(pred)
    _check(tuple(label.shape) == anchor_shape and tuple(score.shape) == anchor_shape,
           f"label/score must have shape {anchor_shape}")
    _check(label.dtype == torch.int64 and score.dtype == _ops.accumulate_dtype(pred.dtype),
           "label must be int64 and score float32 (float64 for float64 pred)")
    loss = pred.new_empty(anchor_shape, dtype=_ops.accumulate_dtype(pred.dtype))
    grad = _ops.grad_buffer(pred, compute_grad)
    weight = _check_weight(pred, weight, anchor_shape)
    _launch_qfl(pred, grad, loss, label.contiguous(), score.contiguous(), pred, weight, beta, activated,
                compute_grad, dense_target=False)
    return _reduce(loss, reduction), grad


@triton_op("gfl_ops::quality_focal_loss_dense_triton", mutates_args=())
def quality_focal_loss_dense_triton(pred: Tensor, target: Tensor, weight: Optional[Tensor], beta: float,
                                    activated: bool, reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    _check_pred(pred, 2)
    _ops.check_same_device(pred, target)
    _check(target.shape == pred.shape and target.dtype in (pred.dtype, _ops.accumulate_dtype(pred.dtype)),
           "target must have pred's shape, and pred's dtype or float32 (float64 for float64 pred)")
    loss = pred.new_empty(_ops.anchor_shape(pred), dtype=_ops.accumulate_dtype(pred.dtype))
    grad = _ops.grad_buffer(pred, compute_grad)
    weight = _check_weight(pred, weight, _ops.anchor_shape(pred))
    _launch_qfl(pred, grad, loss, loss, loss, target, weight, beta, activated, compute_grad, dense_target=True)
    return _reduce(loss, reduction), grad


def _launch_bin_rows(kernel, pred: Tensor, grad: Tensor, outputs: List[Tensor], compute_grad: bool,
                     **constants) -> None:
    num_rows, num_bins = pred.shape
    if num_rows == 0:
        return
    block_rows, block_bins = _bin_blocks(num_bins)
    grad_strides = grad.stride() if compute_grad else (0, 0)
    wrap_triton(kernel)[(triton.cdiv(num_rows, block_rows),)](
        pred, grad if compute_grad else pred, *outputs,
        num_rows, num_bins, pred.stride(0), pred.stride(1), grad_strides[0], grad_strides[1],
        ACC_DTYPE=_acc_dtype(pred), NEED_GRAD=compute_grad, BLOCK_ROWS=block_rows, BLOCK_BINS=block_bins,
        num_warps=_num_warps(block_rows * block_bins), **constants,
    )


def _check_bins(pred: Tensor) -> None:
    _check_pred(pred, 2)
    _check(pred.dim() == 2 and pred.shape[1] >= 2, f"pred must be (M, n + 1) with n + 1 >= 2, got {tuple(pred.shape)}")


@triton_op("gfl_ops::distribution_focal_loss_triton", mutates_args=())
def distribution_focal_loss_triton(pred: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                                   compute_grad: bool) -> Tuple[Tensor, Tensor]:
    _check_bins(pred)
    _ops.check_same_device(pred, target)
    _check(tuple(target.shape) == (pred.shape[0],) and target.dtype == _ops.accumulate_dtype(pred.dtype),
           "target must be (M,) float32 (float64 for float64 pred)")
    loss = pred.new_empty((pred.shape[0],), dtype=_ops.accumulate_dtype(pred.dtype))
    grad = _ops.grad_buffer(pred, compute_grad)
    weight = _check_weight(pred, weight, (pred.shape[0],))
    _launch_bin_rows(kernels.dfl_kernel, pred, grad, [loss, target.contiguous(), loss if weight is None else weight],
                     compute_grad, HAS_WEIGHT=weight is not None)
    return _reduce(loss, reduction), grad


@triton_op("gfl_ops::distribution_integral_triton", mutates_args=())
def distribution_integral_triton(pred: Tensor, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    _check_bins(pred)
    value = pred.new_empty((pred.shape[0],))
    grad = _ops.grad_buffer(pred, compute_grad)
    _launch_bin_rows(kernels.integral_kernel, pred, grad, [value], compute_grad)
    return value, grad


for _operator in _ops.OPERATORS:
    torch.library.register_autograd(
        f"gfl_ops::{_operator}_triton",
        _ops.backward,
        setup_context=functools.partial(
            _ops.setup_context, operator=getattr(torch.ops.gfl_ops, f"{_operator}_triton").default
        ),
    )
