"""torch.library.opcheck on every registered operator torch.ops.gfl_ops.*.

Checks the schema (no hidden mutation or aliasing), the autograd registration, the fake
(meta) kernel against the real one (shapes, dtypes, strides) and AOT dispatch with dynamic
shapes: of the public operators with pred requiring grad and not, and of their native
kernels (no autograd of their own: pred does not require grad) with compute_grad True and
False.
"""

import pytest
import torch

import gfl_ops  # noqa: F401  (registers the operators)
from _helpers import (
    DEVICES,
    anchor_shape,
    make_bin_pred,
    make_class_pred,
    make_dfl_target,
    make_generator,
    make_labels,
    make_scores,
)

OPS = torch.ops.gfl_ops


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _qfl_samples(device, dtype, grad):
    gen = make_generator("opcheck-qfl", dtype, grad)
    samples = []
    for layout, anchors, classes in [("contiguous", 6, 5), ("channels_last", (2, 2, 3), 4), ("sliced", 5, 3)]:
        pred = make_class_pred(layout, anchors, classes, dtype, device, gen).requires_grad_(grad)
        label = make_labels(anchor_shape(pred), classes, gen, device)
        score = make_scores(anchor_shape(pred), _acc(dtype), gen, device)
        samples.append((pred, label, score, None, None, 2.0, False, "none", grad))
        weight = make_scores(anchor_shape(pred), _acc(dtype), gen, device)
        class_weight = make_scores((classes,), _acc(dtype), gen, device)
        samples.append((pred, label, score, weight, class_weight, 1.5, False, "sum", grad))
    pred = make_class_pred("nchw", (1, 2, 2), 3, dtype, device, gen, activated=True).requires_grad_(grad)
    samples.append(
        (
            pred,
            make_labels((1, 2, 2), 3, gen, device),
            make_scores((1, 2, 2), _acc(dtype), gen, device),
            None,
            None,
            2.0,
            True,
            "sum",
            grad,
        )
    )
    return samples


def _dense_samples(device, dtype, grad):
    gen = make_generator("opcheck-dense", dtype, grad)
    samples = []
    for layout, anchors, classes in [("contiguous", 6, 5), ("channels_last", (2, 2, 3), 4), ("transposed", 5, 3)]:
        pred = make_class_pred(layout, anchors, classes, dtype, device, gen).requires_grad_(grad)
        target = torch.rand(pred.shape, generator=gen).to(dtype).to(device)
        samples.append((pred, target, None, None, 2.0, False, "none", grad))
        samples.append(
            (pred, target, make_scores(anchor_shape(pred), _acc(dtype), gen, device), None, 0.5, False, "sum", grad)
        )
    return samples


def _elementwise_samples(device, dtype, grad, seed):
    """(pred, label, score, dense target, anchor weight, element weight, class weight) per
    layout, for focal and varifocal."""
    gen = make_generator(seed, dtype, grad)
    for layout, anchors, classes in [("contiguous", 6, 5), ("channels_last", (2, 2, 3), 4), ("transposed", 5, 3)]:
        pred = make_class_pred(layout, anchors, classes, dtype, device, gen).requires_grad_(grad)
        yield (
            pred,
            make_labels(anchor_shape(pred), classes, gen, device),
            make_scores(anchor_shape(pred), _acc(dtype), gen, device),
            torch.rand(pred.shape, generator=gen).to(dtype).to(device),
            make_scores(anchor_shape(pred), _acc(dtype), gen, device),
            torch.rand(pred.shape, generator=gen, dtype=_acc(dtype)).to(device),
            make_scores((classes,), _acc(dtype), gen, device),
        )


def _focal_samples(device, dtype, grad):
    samples = []
    for pred, label, _, target, weight, element_weight, class_weight in _elementwise_samples(
        device, dtype, grad, "opcheck-focal"
    ):
        samples.append((pred, label, None, None, 0.25, 2.0, False, "none", grad))
        samples.append((pred, target, weight, class_weight, -1.0, 1.5, False, "sum", grad))
        samples.append((pred, label, element_weight, None, 0.25, 0.5, False, "none", grad))
    return samples


def _varifocal_samples(device, dtype, grad):
    samples = []
    for pred, label, score, target, weight, element_weight, class_weight in _elementwise_samples(
        device, dtype, grad, "opcheck-varifocal"
    ):
        samples.append((pred, label, score, None, None, 0.75, 2.0, True, False, False, "none", grad))
        samples.append((pred, target, None, weight, class_weight, 0.75, 1.5, False, True, False, "sum", grad))
        samples.append((pred, target, None, element_weight, None, 0.5, 3.0, True, False, False, "none", grad))
    return samples


def _dfl_samples(device, dtype, grad):
    gen = make_generator("opcheck-dfl", dtype, grad)
    samples = []
    for layout, rows, bins in [("contiguous", 8, 17), ("transposed", 5, 4), ("sliced", 3, 8)]:
        pred = make_bin_pred(layout, rows, bins, dtype, device, gen).requires_grad_(grad)
        samples.append((pred, make_dfl_target(rows, bins, _acc(dtype), gen, device), None, "none", grad))
        samples.append(
            (
                pred,
                make_dfl_target(rows, bins, _acc(dtype), gen, device),
                make_scores((rows,), _acc(dtype), gen, device),
                "sum",
                grad,
            )
        )
    return samples


def _integral_samples(device, dtype, grad):
    gen = make_generator("opcheck-integral", dtype, grad)
    samples = []
    for layout, rows, bins in [("contiguous", 8, 17), ("transposed", 5, 4), ("row_strided", 3, 8)]:
        pred = make_bin_pred(layout, rows, bins, dtype, device, gen).requires_grad_(grad)
        samples.append((pred, None, grad))
        samples.append((pred, make_scores((rows,), _acc(dtype), gen, device), grad))
    return samples


SAMPLES = {
    "quality_focal_loss": _qfl_samples,
    "quality_focal_loss_dense": _dense_samples,
    "sigmoid_focal_loss": _focal_samples,
    "varifocal_loss": _varifocal_samples,
    "distribution_focal_loss": _dfl_samples,
    "distribution_integral": _integral_samples,
}


def _public_arguments(name, kernel_arguments):
    """The public operator's arguments for a kernel's: less compute_grad (and the integral's
    grad_scale), with the backend's default."""
    return kernel_arguments[:1] if name == "distribution_integral" else kernel_arguments[:-1]


def _check(op, args):
    result = torch.library.opcheck(op, args)
    failed = {test: outcome for test, outcome in result.items() if outcome != "SUCCESS"}
    assert not failed, f"{op}: {failed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("grad", [True, False], ids=["requires_grad", "no_grad"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck_public_operator(device, name, grad, dtype):
    for args in SAMPLES[name](device, dtype, grad):
        _check(getattr(OPS, name).default, _public_arguments(name, args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("compute_grad", [True, False], ids=["compute_grad", "no_grad"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck_native_kernel(device, name, compute_grad, dtype):
    for args in SAMPLES[name](device, dtype, compute_grad):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        _check(getattr(OPS, f"_{name}_native").default, args)


def test_every_registered_operator_is_opchecked():
    """A new operator in csrc/gfl_ops.cpp needs sample inputs here."""
    assert set(SAMPLES) == set(gfl_ops._ops.OPERATORS)
    for name in SAMPLES:
        assert hasattr(OPS, name) and hasattr(OPS, f"_{name}_native")
