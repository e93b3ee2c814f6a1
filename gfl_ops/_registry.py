"""Each operator of gfl_ops declared once for Python: its fake value, the Triton launch that
computes it, and sample inputs of its kernels. Everything that lists operators reads
OPERATORS: the fake kernels (_ops.py), the Triton kernels (triton/ops.py), backend
selection, opcheck, the GPU session's sanitizer workload (benchmarks/gpu_workload.py) and
the tests of the registrations.

The C++ side declares the same operators once, in csrc/gfl_operators.h (names, schemas,
bodies); the schemas are the source of every argument name, and this module reads them
rather than repeating them: a fake, a Triton kernel or a sample sees its operator's
arguments by name. tests/operators/test_backends.py checks that both lists agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

from ._reduction import accumulate_dtype

Arguments = Dict[str, Any]

# The reductions the loss operators apply themselves (the mean is their sum divided by the
# anchor count or avg_factor, a scalar operation left to autograd).
KERNEL_REDUCTIONS = ("none", "sum")


@dataclass(frozen=True)
class Operator:
    """One operator: gfl_ops::<name>, its kernels gfl_ops::_<name>_<backend> and its plan."""

    name: str
    # The public operator's value as a fake tensor (shape, dtype, strides), from its named
    # arguments: what torch.compile and opcheck see without running a kernel.
    fake_value: Callable[[Arguments], Tensor]
    # How a Triton kernel fills the plan's outputs: a key of gfl_ops/triton/ops.py's LAUNCHES.
    triton_launch: str
    # Small kernel arguments by name (compute_grad = requires_grad) on (device, dtype,
    # requires_grad), in every layout the kernels walk differently.
    samples: Callable[[str, torch.dtype, bool], List[Arguments]]

    def kernel_name(self, backend: str) -> str:
        return f"_{self.name}_{backend}"


def _schema(namespace: str, operator_name: str):
    return getattr(getattr(torch.ops, namespace), operator_name).default._schema


def argument_names(namespace: str, operator_name: str) -> Tuple[str, ...]:
    """The argument names of the registered operator namespace::operator_name, in order."""
    return tuple(argument.name for argument in _schema(namespace, operator_name).arguments)


def positional(namespace: str, operator_name: str, named: Arguments) -> tuple:
    """Named arguments in the order of the operator's schema (names it lacks are ignored).
    Only trailing arguments with a default may be left out (the public operator's backend);
    any other missing one raises, rather than shift the rest into its place."""
    arguments = _schema(namespace, operator_name).arguments
    given = sum(1 for argument in arguments if argument.name in named)
    leading = all(argument.name in named for argument in arguments[:given])
    if not leading or not all(argument.has_default_value() for argument in arguments[given:]):
        missing = [argument.name for argument in arguments if argument.name not in named]
        raise ValueError(f"{namespace}::{operator_name}: arguments {missing} are missing")
    return tuple(named[argument.name] for argument in arguments[:given])


# --------------------------------------------------------------------------------------
# Fake values
# --------------------------------------------------------------------------------------


def anchor_shape(pred: Tensor) -> tuple:
    """pred's shape without the class dimension 1: the shape of the per-anchor loss."""
    return (pred.shape[0],) + tuple(pred.shape[2:])


def _check_same_device(arguments: Arguments) -> None:
    """The kernels' device check, for fake kernels (which run without the kernels)."""
    pred = arguments["pred"]
    for other in arguments.values():
        if isinstance(other, Tensor):
            torch._check(
                other.device == pred.device,
                lambda: f"gfl_ops: all tensors must be on pred's device {pred.device}, got one on {other.device}",
            )


def _check_kernel_reduction(reduction: str) -> None:
    torch._check(
        reduction in KERNEL_REDUCTIONS,
        lambda: f"gfl_ops: reduction must be one of {KERNEL_REDUCTIONS}, got {reduction!r}",
    )


def _loss_of_rows(shape_of: Callable[[Tensor], tuple]) -> Callable[[Arguments], Tensor]:
    """A loss of one value per anchor or row (QFL, DFL): that shape, or 0-dim for "sum"."""

    def fake_value(arguments: Arguments) -> Tensor:
        _check_same_device(arguments)
        pred, reduction = arguments["pred"], arguments["reduction"]
        _check_kernel_reduction(reduction)
        shape = shape_of(pred) if reduction == "none" else ()
        return pred.new_empty(shape, dtype=accumulate_dtype(pred.dtype))

    return fake_value


def _loss_of_elements(arguments: Arguments) -> Tensor:
    """An elementwise loss (focal, varifocal): pred's shape and layout for "none", 0-dim for "sum"."""
    _check_same_device(arguments)
    pred, reduction = arguments["pred"], arguments["reduction"]
    _check_kernel_reduction(reduction)
    dtype = accumulate_dtype(pred.dtype)
    return torch.empty_like(pred, dtype=dtype) if reduction == "none" else pred.new_empty((), dtype=dtype)


def _integral_value(arguments: Arguments) -> Tensor:
    pred = arguments["pred"]
    return pred.new_empty((pred.shape[0],))


# --------------------------------------------------------------------------------------
# Samples: small inputs, contiguous and not, every argument exercised
# --------------------------------------------------------------------------------------


def _generator(name: str, dtype: torch.dtype, grad: bool) -> torch.Generator:
    seed = sum(map(ord, f"{name}-{dtype}-{grad}"))
    return torch.Generator().manual_seed(seed)


def _class_pred(layout: str, anchors, classes: int, dtype, device, gen, grad: bool, activated=False) -> Tensor:
    """Logits (probabilities in (0, 1) if activated): (N, C) rows, a channels-last
    (B, C, H, W) map, (N, C) sliced out of wider rows, or (N, C) transposed from (C, N)."""

    def values(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
        return (torch.sigmoid(x).clamp(0.01, 0.99) if activated else x).to(dtype).to(device)

    if layout == "rows":
        pred = values(anchors, classes)
    elif layout == "channels_last":
        pred = values(*anchors, classes).permute(0, 3, 1, 2)
    elif layout == "sliced":
        pred = values(anchors, classes + 5)[:, :classes]
    else:  # transposed
        pred = values(classes, anchors).t()
    return pred.requires_grad_(grad)


def _labels(shape, classes: int, gen, device) -> Tensor:
    """int64 labels: half of them positives in [0, C), the rest background (C and -1)."""
    positive = torch.randint(0, classes, shape, generator=gen)
    background = torch.where(torch.rand(shape, generator=gen) < 0.5, classes, -1)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, positive, background).to(device)


def _uniform(shape, dtype, gen, device) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


_CLASS_LAYOUTS = (("rows", 6, 5), ("channels_last", (2, 2, 3), 4), ("sliced", 5, 3), ("transposed", 5, 3))


def _class_inputs(name: str, device: str, dtype, grad: bool, activated=False, layouts=_CLASS_LAYOUTS):
    """Per layout: pred and every target and weight a classification loss can take."""
    gen = _generator(name, dtype, grad)
    acc = accumulate_dtype(dtype)
    for layout, anchors, classes in layouts:
        pred = _class_pred(layout, anchors, classes, dtype, device, gen, grad, activated)
        shape = anchor_shape(pred)
        yield {
            "pred": pred,
            "label": _labels(shape, classes, gen, device),
            "score": _uniform(shape, acc, gen, device),
            "dense": _uniform(pred.shape, dtype, gen, device),
            "weight": _uniform(shape, acc, gen, device),
            "element_weight": _uniform(pred.shape, acc, gen, device),
            "class_weight": _uniform((classes,), acc, gen, device),
        }


def _quality_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    plain = {"weight": None, "class_weight": None, "beta": 2.0, "activated": False, "reduction": "none"}
    samples = []
    for x in _class_inputs("quality", device, dtype, grad):
        target = {"pred": x["pred"], "label": x["label"], "score": x["score"], "compute_grad": grad}
        samples.append({**target, **plain})
        weighted = {"weight": x["weight"], "class_weight": x["class_weight"], "beta": 1.5, "reduction": "sum"}
        samples.append({**target, **plain, **weighted})
    layouts = (("channels_last", (1, 2, 2), 3),)
    for x in _class_inputs("quality-probabilities", device, dtype, grad, activated=True, layouts=layouts):
        target = {"pred": x["pred"], "label": x["label"], "score": x["score"], "compute_grad": grad}
        samples.append({**target, **plain, "activated": True, "reduction": "sum"})
    return samples


def _quality_dense_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    plain = {"weight": None, "class_weight": None, "beta": 2.0, "activated": False, "reduction": "none"}
    samples = []
    for x in _class_inputs("quality-dense", device, dtype, grad):
        target = {"pred": x["pred"], "target": x["dense"], "compute_grad": grad}
        samples.append({**target, **plain})
        weighted = {"weight": x["weight"], "class_weight": x["class_weight"], "beta": 0.5, "reduction": "sum"}
        samples.append({**target, **plain, **weighted})
    return samples


def _focal_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    plain = {"weight": None, "class_weight": None, "alpha": 0.25, "gamma": 2.0, "activated": False}
    samples = []
    for x in _class_inputs("focal", device, dtype, grad):
        common = {"pred": x["pred"], "compute_grad": grad, **plain}
        samples.append({**common, "target": x["label"], "reduction": "none"})
        weighted = {"weight": x["weight"], "class_weight": x["class_weight"], "alpha": -1.0, "gamma": 1.5}
        samples.append({**common, **weighted, "target": x["dense"], "reduction": "sum"})
        element_weighted = {"weight": x["element_weight"], "gamma": 0.5}
        samples.append({**common, **element_weighted, "target": x["label"], "reduction": "none"})
    return samples


def _varifocal_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    plain = {"score": None, "weight": None, "class_weight": None, "alpha": 0.75, "gamma": 2.0}
    plain.update({"iou_weighted": True, "detach_weight": False, "activated": False, "reduction": "none"})
    samples = []
    for x in _class_inputs("varifocal", device, dtype, grad):
        common = {"pred": x["pred"], "compute_grad": grad, **plain}
        samples.append({**common, "target": x["label"], "score": x["score"]})
        weighted = {"weight": x["weight"], "class_weight": x["class_weight"], "gamma": 1.5, "reduction": "sum"}
        samples.append({**common, **weighted, "target": x["dense"], "iou_weighted": False, "detach_weight": True})
        samples.append({**common, "target": x["dense"], "weight": x["element_weight"], "alpha": 0.5, "gamma": 3.0})
    return samples


_BIN_LAYOUTS = (("rows", 8, 17), ("transposed", 5, 4), ("row_strided", 3, 8))


def _bin_pred(layout: str, rows: int, bins: int, dtype, device, gen, grad: bool) -> Tensor:
    """(M, n + 1) logits: rows, transposed from (n + 1, M), or every other row of (2M, n + 1)."""

    def values(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)

    if layout == "rows":
        pred = values(rows, bins)
    elif layout == "transposed":
        pred = values(bins, rows).t()
    else:  # row_strided
        pred = values(2 * rows, bins)[::2]
    return pred.requires_grad_(grad)


def _dfl_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    gen = _generator("dfl", dtype, grad)
    acc = accumulate_dtype(dtype)
    samples = []
    for layout, rows, bins in _BIN_LAYOUTS:
        pred = _bin_pred(layout, rows, bins, dtype, device, gen, grad)
        target = torch.rand(rows, generator=gen, dtype=torch.float64) * (bins - 1)
        target[0] = bins - 1  # the last bin is a valid target
        common = {"pred": pred, "target": target.to(acc).to(device), "compute_grad": grad}
        samples.append({**common, "weight": None, "reduction": "none"})
        samples.append({**common, "weight": _uniform((rows,), acc, gen, device), "reduction": "sum"})
    return samples


def _integral_samples(device: str, dtype: torch.dtype, grad: bool) -> List[Arguments]:
    gen = _generator("integral", dtype, grad)
    samples = []
    for layout, rows, bins in _BIN_LAYOUTS:
        pred = _bin_pred(layout, rows, bins, dtype, device, gen, grad)
        samples.append({"pred": pred, "grad_scale": None, "compute_grad": grad})
        scale = _uniform((rows,), accumulate_dtype(dtype), gen, device)
        samples.append({"pred": pred, "grad_scale": scale, "compute_grad": grad})
    return samples


# --------------------------------------------------------------------------------------
# The operators
# --------------------------------------------------------------------------------------

OPERATORS: Dict[str, Operator] = {
    operator.name: operator
    for operator in (
        Operator("quality_focal_loss", _loss_of_rows(anchor_shape), "classification", _quality_samples),
        Operator("quality_focal_loss_dense", _loss_of_rows(anchor_shape), "classification", _quality_dense_samples),
        Operator("sigmoid_focal_loss", _loss_of_elements, "classification", _focal_samples),
        Operator("varifocal_loss", _loss_of_elements, "classification", _varifocal_samples),
        Operator("distribution_focal_loss", _loss_of_rows(lambda pred: (pred.shape[0],)), "dfl", _dfl_samples),
        Operator("distribution_integral", _integral_value, "integral", _integral_samples),
    )
}
