"""Gradients of the native kernels against finite differences of the kernels' own loss, in
float64: torch.autograd.gradcheck, and a directional check that builds a fresh graph for
every backward.

The analytic gradient comes from the kernel (computed in the forward pass, scaled in the
backward, in place in eager mode). torch.autograd.gradcheck backpropagates through one graph
several times, which exercises the backward's recomputation of the consumed gradient; the
directional check builds a fresh graph for every backward.
"""

import pytest
import torch

import gfl_ops
from _helpers import (
    DEVICES,
    make_bin_pred,
    make_class_pred,
    make_dfl_target,
    make_generator,
    make_labels,
    make_scores,
    anchor_shape,
)

CLASS_LAYOUTS = [
    ("contiguous", 5, 4),
    ("channels_last", (2, 2, 3), 3),
    ("nchw", (1, 2, 3), 4),
    ("sliced", 4, 3),
    ("transposed", 5, 3),
]
BIN_LAYOUTS = [("contiguous", 5, 6), ("transposed", 4, 5), ("sliced", 3, 17), ("row_strided", 4, 3)]


def _id(case):
    return f"{case[0]}-{case[2]}"


METHODS = [
    pytest.param("directional", id="directional"),
    pytest.param("gradcheck", id="gradcheck"),
]


def _check(method, fn, pred):
    if method == "directional":
        _directional_check(fn, pred)
    else:
        _gradcheck(fn, pred)


def _gradcheck(fn, pred):
    """torch.autograd.gradcheck (slow mode: the full Jacobian)."""
    leaf = pred.detach().requires_grad_()
    assert torch.autograd.gradcheck(fn, (leaf,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _directional_check(fn, pred, probes=4, h=1e-6):
    """<v, J u> from one backward per fresh graph against central differences of fn.

    u: a random direction in pred's space; v: a random cotangent of fn's output.
    """
    gen = torch.Generator().manual_seed(7)
    for _ in range(probes):
        u = torch.randn(pred.shape, generator=gen, dtype=torch.float64).to(pred.device)
        leaf = pred.detach().requires_grad_()
        out = fn(leaf)
        v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(pred.device)
        (grad,) = torch.autograd.grad((out * v).sum(), leaf)
        analytic = (grad * u).sum().item()
        with torch.no_grad():
            plus = (fn(pred.detach() + h * u) * v).sum().item()
            minus = (fn(pred.detach() - h * u) * v).sum().item()
        numeric = (plus - minus) / (2 * h)
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CLASS_LAYOUTS, ids=_id)
@pytest.mark.parametrize(
    "beta,activated,reduction",
    [
        (2.0, False, "none"),
        (0.5, False, "mean"),
        (3.0, False, "sum"),
        (1.5, True, "none"),
        (2.0, True, "mean"),
        (0.0, False, "none"),
    ],
)
def test_gradcheck_qfl(method, device, case, beta, activated, reduction):
    layout, anchors, classes = case
    gen = make_generator("gc-qfl", case, beta, activated)
    pred = make_class_pred(layout, anchors, classes, torch.float64, device, gen, activated=activated, scale=1.5)
    label = make_labels(anchor_shape(pred), classes, gen, device)
    score = make_scores(anchor_shape(pred), torch.float64, gen, device)
    weight = make_scores(anchor_shape(pred), torch.float64, gen, device) + 0.5

    def fn(p):
        return gfl_ops.quality_focal_loss(
            p, label, score, beta=beta, activated=activated, weight=weight, reduction=reduction, backend="native"
        )

    _check(method, fn, pred)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CLASS_LAYOUTS, ids=_id)
@pytest.mark.parametrize("beta,activated", [(2.0, False), (1.5, True), (3.0, False)])
def test_gradcheck_qfl_dense(method, device, case, beta, activated):
    layout, anchors, classes = case
    gen = make_generator("gc-dense", case, beta, activated)
    pred = make_class_pred(layout, anchors, classes, torch.float64, device, gen, activated=activated, scale=1.5)
    target = torch.rand(pred.shape, generator=gen, dtype=torch.float64).to(device)

    def fn(p):
        return gfl_ops.quality_focal_loss_dense(
            p, target, beta=beta, activated=activated, reduction="mean", avg_factor=2.5, backend="native"
        )

    _check(method, fn, pred)


# (loss, target form, gamma, activated, reduction, weighting): every closed form and pow,
# both reductions the kernels take, "none" of pred's shape with an element weight.
FAMILY_CASES = [
    ("focal", "labels", 2.0, False, "none", "anchor"),
    ("focal", "soft", 1.5, False, "sum", "element"),
    ("focal", "soft", 2.5, True, "none", "class"),
    ("varifocal", "label_score", 2.0, False, "none", "element"),
    ("varifocal", "dense", 0.5, False, "mean", "anchor"),
    ("varifocal", "dense", 2.0, True, "sum", "class"),
    ("varifocal_detached", "label_score", 1.5, False, "none", "anchor"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CLASS_LAYOUTS, ids=_id)
@pytest.mark.parametrize("loss,form,gamma,activated,reduction,weighting", FAMILY_CASES, ids=lambda value: str(value))
def test_gradcheck_focal_family(method, device, case, loss, form, gamma, activated, reduction, weighting):
    layout, anchors, classes = case
    gen = make_generator("gc-family", case, loss, form, gamma, activated)
    pred = make_class_pred(layout, anchors, classes, torch.float64, device, gen, activated=activated, scale=1.5)
    label = make_labels(anchor_shape(pred), classes, gen, device)
    score = make_scores(anchor_shape(pred), torch.float64, gen, device)
    # Soft targets in [0.05, 0.95] keep focal's 1 - p_t and varifocal's p - t off 0, where the
    # weight's derivative is not defined for gamma < 1.
    soft = (torch.rand(pred.shape, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(device)
    if form == "dense":
        soft = torch.where(torch.rand(pred.shape, generator=gen) < 0.3, soft, torch.zeros_like(soft))
    target = {"labels": label, "soft": soft, "dense": soft, "label_score": (label, score)}[form]
    weights = {
        "anchor": dict(weight=make_scores(anchor_shape(pred), torch.float64, gen, device) + 0.5),
        "element": dict(weight=torch.rand(pred.shape, generator=gen, dtype=torch.float64).to(device) + 0.5),
        "class": dict(class_weight=make_scores((classes,), torch.float64, gen, device) + 0.5),
    }[weighting]

    def fn(p):
        options = dict(gamma=gamma, activated=activated, reduction=reduction, backend="native", **weights)
        if loss == "focal":
            return gfl_ops.sigmoid_focal_loss(p, target, **options)
        return gfl_ops.varifocal_loss(p, target, detach_weight=loss == "varifocal_detached", **options)

    if loss == "varifocal_detached":
        # No gradient through the weight: the finite differences of the loss see it, so the
        # check is against the loss with the weight held at the point (the reference's).
        leaf = pred.detach().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
        ref_leaf = pred.detach().requires_grad_()
        options = dict(gamma=gamma, activated=activated, reduction=reduction, detach_weight=True, **weights)
        (expected,) = torch.autograd.grad(
            gfl_ops.reference.varifocal_loss(
                ref_leaf, *(target if isinstance(target, tuple) else (target,)), **options
            ).sum(),
            ref_leaf,
        )
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
        return
    _check(method, fn, pred)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BIN_LAYOUTS, ids=_id)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradcheck_dfl(method, device, case, reduction):
    layout, rows, bins = case
    gen = make_generator("gc-dfl", case)
    pred = make_bin_pred(layout, rows, bins, torch.float64, device, gen)
    target = make_dfl_target(rows, bins, torch.float64, gen, device)

    def fn(p):
        return gfl_ops.distribution_focal_loss(p, target, reduction=reduction, backend="native")

    _check(method, fn, pred)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BIN_LAYOUTS, ids=_id)
def test_gradcheck_integral(method, device, case):
    layout, rows, bins = case
    gen = make_generator("gc-integral", case)
    pred = make_bin_pred(layout, rows, bins, torch.float64, device, gen)
    _check(method, lambda p: gfl_ops.distribution_integral(p, backend="native"), pred)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_integral_module_and_nd(method, device):
    gen = make_generator("gc-integral-nd")
    x = (torch.randn(3, 4 * 8, generator=gen, dtype=torch.float64)).to(device)
    _check(method, gfl_ops.nn.Integral(reg_max=7, backend="native"), x)
    y = torch.randn(4, 2, 5, generator=gen, dtype=torch.float64).to(device).transpose(0, 1)
    _check(method, lambda p: gfl_ops.distribution_integral(p, backend="native"), y)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_direct_ops(method, device, reduction):
    """The public operators torch.ops.gfl_ops.* called directly: the loss (per anchor, or
    summed inside the operator), differentiable by the autograd kernel."""
    gen = make_generator("gc-ops")
    ops = torch.ops.gfl_ops
    pred = make_class_pred("channels_last", (1, 2, 3), 4, torch.float64, device, gen)
    label = make_labels(anchor_shape(pred), 4, gen, device)
    score = make_scores(anchor_shape(pred), torch.float64, gen, device)
    target = torch.rand(pred.shape, generator=gen, dtype=torch.float64).to(device)
    _check(method, lambda p: ops.quality_focal_loss(p, label, score, None, None, 2.0, False, reduction), pred)
    _check(method, lambda p: ops.quality_focal_loss_dense(p, target, None, None, 1.5, False, reduction), pred)
    bins = make_bin_pred("transposed", 4, 6, torch.float64, device, gen)
    dfl_target = make_dfl_target(4, 6, torch.float64, gen, device)
    _check(method, lambda p: ops.distribution_focal_loss(p, dfl_target, None, reduction), bins)
    _check(method, lambda p: ops.distribution_integral(p), bins)


@pytest.mark.parametrize("op", ["qfl", "dfl", "integral"])
def test_second_backward_through_one_graph(op):
    """retain_graph=True then a second backward: the same gradient again, as the reference gives."""
    gen = make_generator("twice", op)
    if op == "qfl":
        pred = make_class_pred("contiguous", 5, 4, torch.float64, "cpu", gen).requires_grad_()
        label, score = make_labels((5,), 4, gen, "cpu"), make_scores((5,), torch.float64, gen, "cpu")
        loss = gfl_ops.quality_focal_loss(pred, label, score, backend="native")
    elif op == "dfl":
        pred = make_bin_pred("contiguous", 5, 6, torch.float64, "cpu", gen).requires_grad_()
        loss = gfl_ops.distribution_focal_loss(pred, make_dfl_target(5, 6, torch.float64, gen, "cpu"), backend="native")
    else:
        pred = make_bin_pred("contiguous", 5, 6, torch.float64, "cpu", gen).requires_grad_()
        loss = gfl_ops.distribution_integral(pred, backend="native").sum()
    (first,) = torch.autograd.grad(loss, pred, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_backward_through_a_freed_graph_raises():
    """As PyTorch's own operators: the saved inputs are released after a backward."""
    gen = make_generator("freed")
    pred = make_bin_pred("contiguous", 5, 6, torch.float64, "cpu", gen).requires_grad_()
    loss = gfl_ops.distribution_focal_loss(pred, make_dfl_target(5, 6, torch.float64, gen, "cpu"), backend="native")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_pred_modified_in_place_after_the_forward_raises():
    """A gradient computed for values pred no longer holds would be silently wrong."""
    gen = make_generator("inplace")
    leaf = make_class_pred("contiguous", 5, 4, torch.float64, "cpu", gen).requires_grad_()
    pred = leaf * 1.0
    loss = gfl_ops.quality_focal_loss(
        pred, make_labels((5,), 4, gen, "cpu"), make_scores((5,), torch.float64, gen, "cpu"), backend="native"
    )
    with torch.no_grad():
        pred.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
def test_batched_incoming_gradients(set_gradient_pass, gradient_pass):
    """gradcheck's check_batched_grad and jacobian(vectorize=True) call backward once with a
    batch of incoming gradients (vmap): the fused backward must not scale its one gradient
    buffer in place by a batched tensor."""
    set_gradient_pass("cpu", gradient_pass)
    gen = make_generator("batched", gradient_pass)
    pred = make_class_pred("contiguous", 5, 4, torch.float64, "cpu", gen)
    label, score = make_labels((5,), 4, gen, "cpu"), make_scores((5,), torch.float64, gen, "cpu")
    bins = make_bin_pred("contiguous", 4, 6, torch.float64, "cpu", gen)
    dfl_target = make_dfl_target(4, 6, torch.float64, gen, "cpu")
    losses = [
        (pred, lambda p, backend: gfl_ops.quality_focal_loss(p, label, score, reduction="none", backend=backend)),
        (bins, lambda p, backend: gfl_ops.distribution_focal_loss(p, dfl_target, reduction="none", backend=backend)),
        (bins, lambda p, backend: gfl_ops.distribution_integral(p, backend=backend)),
    ]
    for values, loss in losses:
        leaf = values.detach().requires_grad_()
        native = lambda p: loss(p, "native")  # noqa: E731
        assert torch.autograd.gradcheck(native, (leaf,), check_batched_grad=True)
        jacobian = torch.autograd.functional.jacobian(native, leaf, vectorize=True)
        expected = torch.autograd.functional.jacobian(lambda p: loss(p, "reference"), leaf)
        torch.testing.assert_close(jacobian, expected)
