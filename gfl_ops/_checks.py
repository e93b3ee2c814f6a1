"""The argument checks of the public functions and modules, in one place.

Each raises before any kernel runs, with an error that names the argument and says what is
wrong with it: TypeError for a wrong type or dtype, ValueError for a wrong value, shape or
device. (The kernels check again what keeps them in bounds: csrc/gfl_checks.cpp.)
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from . import _backends
from ._reduction import REDUCTIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
AvgFactor = Optional[Union[float, Tensor]]
# The kernels compute in float32 for every pred but float64: an exponent must fit.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def require_tensor(value, name: str, op: str) -> None:
    """A dense (strided) torch.Tensor: the kernels read memory through strides, which sparse
    and other layouts do not have."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {value.layout}")


def is_number(value) -> bool:
    """A real number: int, float, numpy scalars, symbolic numbers under torch.compile; not a bool."""
    return isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _comparable(value):
    """A numpy scalar as a Python float, so that comparing it with float32's max does not
    first cast that max to the scalar's type (numpy.float16: an overflow warning, and inf)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def check_pred(pred: Tensor, op: str) -> None:
    require_tensor(pred, "pred", op)
    if pred.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: pred must be float16, bfloat16, float32 or float64, got {pred.dtype}")


def check_same_device(pred: Tensor, other: Tensor, name: str, op: str) -> None:
    if other.device != pred.device:
        raise ValueError(f"{op}: {name} is on {other.device} but pred is on {pred.device}")


def check_class_pred(pred: Tensor, op: str) -> None:
    check_pred(pred, op)
    if pred.dim() < 2:
        raise ValueError(f"{op}: pred must be (N, C) or (B, C, d1, ..., dk), got shape {tuple(pred.shape)}")
    if pred.shape[1] == 0:
        raise ValueError(f"{op}: pred has no classes (C = 0), shape {tuple(pred.shape)}")


def check_exponent(value, name: str, op: str) -> None:
    """A finite number >= 0 that float32 holds (the kernels' maths type). Comparisons rather
    than math.isfinite, which torch.compile(dynamic=True) cannot trace for a float it made
    symbolic; NaN fails the first comparison."""
    if not (is_number(value) and 0 <= _comparable(value) <= _FLOAT32_MAX):
        raise ValueError(
            f"{op}: {name} must be a finite number >= 0 (at most float32's {_FLOAT32_MAX:.4g}), got {value!r}"
        )


def _anchor_shape(pred: Tensor) -> tuple:
    return (pred.shape[0],) + tuple(pred.shape[2:])


def check_finite(value, name: str, op: str) -> float:
    """A finite number (comparisons, which torch.compile traces; NaN fails them)."""
    if not (is_number(value) and -_FLOAT32_MAX <= _comparable(value) <= _FLOAT32_MAX):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    return value


def check_alpha(alpha, op: str) -> float:
    """Focal loss's alpha: a finite number, or None, which (as a negative alpha) switches the
    alpha weighting off: returned as -1."""
    return -1.0 if alpha is None else check_finite(alpha, "alpha", op)


def check_dense_target(pred: Tensor, target: Tensor, op: str) -> None:
    """A float target of pred's shape on pred's device."""
    require_tensor(target, "target", op)
    check_same_device(pred, target, "target", op)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{op}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if not target.dtype.is_floating_point:
        raise TypeError(f"{op}: target must be a floating-point tensor, got {target.dtype}")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_labels_or_dense_target(pred: Tensor, target: Tensor, op: str) -> bool:
    """Focal loss's target: integer labels of the anchor shape, or a target of pred's shape
    (mmdetection's rule: as many dimensions as pred), float or a one-hot of any real dtype.
    Returns whether it is the dense one."""
    require_tensor(target, "target", op)
    check_same_device(pred, target, "target", op)
    if target.dim() == pred.dim():
        if tuple(target.shape) != tuple(pred.shape):
            raise ValueError(
                f"{op}: a dense target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}"
            )
        if target.dtype.is_complex:
            raise TypeError(f"{op}: target must be real, got {target.dtype}")
        return True
    if not _is_integer_dtype(target.dtype):
        raise TypeError(f"{op}: labels (a target without pred's class dimension) must be integers, got {target.dtype}")
    check_anchor_tensor(pred, target, "target", op)
    return False


def check_varifocal_target(pred: Tensor, target, op: str):
    """Varifocal loss's target: a dense float tensor of pred's shape, or (label, score).
    Returns (label, score, dense target), None where absent."""
    if isinstance(target, Tensor):
        check_dense_target(pred, target, op)
        return None, None, target
    if not (isinstance(target, (tuple, list)) and len(target) == 2):
        raise TypeError(
            f"{op}: target must be a dense tensor of pred's shape or a (label, score) pair, got {type(target).__name__}"
        )
    label, score = target
    check_label_and_score(pred, label, score, op)
    return label, score, None


def check_class_weight(pred: Tensor, class_weight: Optional[Tensor], op: str) -> None:
    """None, or a float (C,) tensor on pred's device: one weight per class."""
    if class_weight is None:
        return
    require_tensor(class_weight, "class_weight", op)
    check_same_device(pred, class_weight, "class_weight", op)
    if tuple(class_weight.shape) != (pred.shape[1],):
        raise ValueError(
            f"{op}: class_weight must have shape ({pred.shape[1]},), one weight per class of pred "
            f"{tuple(pred.shape)}, got {tuple(class_weight.shape)}"
        )
    if not class_weight.dtype.is_floating_point:
        raise TypeError(f"{op}: class_weight must be a floating-point tensor, got {class_weight.dtype}")


def check_anchor_tensor(pred: Tensor, value: Tensor, name: str, op: str) -> None:
    require_tensor(value, name, op)
    check_same_device(pred, value, name, op)
    expected = _anchor_shape(pred)
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{op}: {name} must have shape {expected} (pred {tuple(pred.shape)} without its "
            f"class dimension 1), got {tuple(value.shape)}"
        )


def check_weight(
    pred: Tensor, weight: Optional[Tensor], loss_shape: tuple, op: str, also: Optional[tuple] = None
) -> None:
    """A weight of the loss's shape (or, for the elementwise losses, `also`: pred's shape)."""
    if weight is None:
        return
    require_tensor(weight, "weight", op)
    check_same_device(pred, weight, "weight", op)
    if tuple(weight.shape) != loss_shape:
        shapes = (
            f"the anchor shape {_anchor_shape(pred)} or pred's shape {also}"
            if also
            else f"the loss's shape {loss_shape}"
        )
        raise ValueError(f"{op}: weight must have {shapes}, got {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")


def broadcast_weight(pred: Tensor, weight: Optional[Tensor], loss_shape: tuple, op: str) -> Optional[Tensor]:
    """A weight of the loss's shape, or one that broadcasts to it (expanded, not copied)."""
    if weight is None:
        return None
    require_tensor(weight, "weight", op)
    check_same_device(pred, weight, "weight", op)
    try:
        expanded = weight.expand(loss_shape)
    except RuntimeError:
        raise ValueError(
            f"{op}: weight must have the loss's shape {loss_shape} or broadcast to it, got {tuple(weight.shape)}"
        ) from None
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    return expanded


def check_avg_factor(pred: Tensor, avg_factor: AvgFactor, op: str) -> None:
    """None, a number, or a one-element tensor on pred's device (or a CPU 0-dim tensor, which
    torch treats as a number): never read on the host."""
    if avg_factor is None or is_number(avg_factor):
        return
    if not isinstance(avg_factor, Tensor):
        raise TypeError(f"{op}: avg_factor must be a number or a tensor, got {type(avg_factor).__name__}")
    require_tensor(avg_factor, "avg_factor", op)
    if avg_factor.numel() != 1:
        raise ValueError(
            f"{op}: avg_factor must be a number or a 1-element tensor, got shape {tuple(avg_factor.shape)}"
        )
    if avg_factor.dtype == torch.bool or avg_factor.dtype.is_complex:
        raise TypeError(f"{op}: avg_factor must be a real number, got a {avg_factor.dtype} tensor")
    cpu_scalar = avg_factor.dim() == 0 and avg_factor.device.type == "cpu"
    if avg_factor.device != pred.device and not cpu_scalar:
        raise ValueError(f"{op}: avg_factor is on {avg_factor.device} but pred is on {pred.device}")


def check_label_and_score(pred: Tensor, label: Tensor, score: Tensor, op: str) -> None:
    check_anchor_tensor(pred, label, "label", op)
    check_anchor_tensor(pred, score, "score", op)
    if not _is_integer_dtype(label.dtype):
        raise TypeError(f"{op}: label must be an integer tensor of class indices, got {label.dtype}")
    if not score.dtype.is_floating_point:
        raise TypeError(f"{op}: score must be a floating-point tensor (the IoU target), got {score.dtype}")


def check_bins(pred: Tensor, op: str) -> None:
    check_pred(pred, op)
    if pred.dim() < 2:
        raise ValueError(
            f"{op}: pred must be (..., n + 1) logits over bins 0..n in its last dimension, "
            f"at least 2-D, got shape {tuple(pred.shape)}"
        )
    if pred.shape[-1] < 2:
        raise ValueError(f"{op}: pred needs at least 2 bins, got shape {tuple(pred.shape)}")


def check_count(value, name: str, minimum: int, op: str) -> None:
    """An int (not a bool) of at least `minimum`: a number of bins, or reg_max."""
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def check_flag(value, name: str, op: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def check_validate(value, op: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{op}: validate must be None, True or False, got {value!r}")


def validate_dfl_target_range(target: Tensor, last_bin: int, validate: Optional[bool]) -> None:
    """target in [0, n] (NaN is out of range), read on the host: with validate=None on CPU
    tensors only (where reading costs no device sync), with validate=True everywhere."""
    if validate is False or (validate is None and target.device.type != "cpu"):
        return
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    lowest, highest = (float(v) for v in torch.aminmax(target.detach()))  # NaN propagates into both
    if not (lowest >= 0 and highest <= last_bin):
        bad = target.detach()[~((target >= 0) & (target <= last_bin))]
        raise ValueError(
            f"distribution_focal_loss: target must lie in [0, {last_bin}] (n + 1 = {last_bin + 1} "
            f"bins; target == {last_bin} is valid), got {bad.numel()} value(s) outside, e.g. "
            f"{bad[:4].tolist()}; clamp it (mmdetection uses reg_max - 0.1) or pass validate=False "
            f"to clamp inside the kernel"
        )


def check_constant_targets(backend: str, op: str, **targets: Tensor) -> None:
    """The kernels differentiate with respect to pred only: targets (IoU scores, soft targets,
    box distances) are constants in GFL. Say so rather than return a wrong None gradient."""
    if backend == "reference" or not torch.is_grad_enabled():
        return
    for name, value in targets.items():
        if value is not None and value.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but backend {backend!r} computes gradients with respect "
                f"to pred only; pass {name}.detach() (targets are constants in GFL) or backend='reference'"
            )


# --------------------------------------------------------------------------------------
# Module constructors (gfl_ops.nn): what a config sets, checked when the module is built
# --------------------------------------------------------------------------------------


def check_backend_name(backend, op: str) -> None:
    names = ("auto",) + _backends.BACKENDS
    if backend not in names:
        raise ValueError(f"{op}: backend must be one of {names}, got {backend!r}")


def check_module_reduction(reduction, op: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_loss_weight(loss_weight, op: str) -> None:
    if not is_number(loss_weight):
        raise TypeError(f"{op}: loss_weight must be a number, got {loss_weight!r}")
