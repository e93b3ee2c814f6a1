"""Sigmoid focal and varifocal loss, and class weights, against the float64 reference.

backend="native" (and, from test_triton_backend.py, "triton") against gfl_ops.reference,
values and gradients. Axes: dtype x layout x odd sizes in each target form (reduction
"none": every element is compared); dtype x reduction x weight (the anchor's, pred's) x
class_weight x avg_factor; exponent (the closed forms 0, 1, 1.5, 2 and pow) x alpha x
probability input; varifocal's iou_weighted and detach_weight, and the positives rule of
each target form. The reference itself is checked against the frameworks' formulas in
test_reference_family.py.
"""

import pytest
import torch

import gfl_ops
from _helpers import (
    DEVICES,
    FLOAT_DTYPES,
    accumulate_dtype,
    anchor_shape,
    apply_class_layout,
    check_parity,
    class_case_id,
    class_params,
    dtype_id,
    make_class_pred,
    make_generator,
    make_labels,
    make_scores,
    reduction_params,
)

EXPONENTS = (0.0, 1.0, 1.5, 2.0, 2.5)
REDUCTIONS = ("none", "mean", "sum")


def focal_call(pred, *, backend, target, **kwargs):
    return gfl_ops.sigmoid_focal_loss(pred, target, backend=backend, **kwargs)


def varifocal_call(pred, *, backend, target, **kwargs):
    return gfl_ops.varifocal_loss(pred, target, backend=backend, **kwargs)


def dense_target(pred, layout, anchors, gen, device, binary=False):
    """A target of pred's layout: soft IoU-like values in [0, 1] on about 30% of the elements
    (1 where binary), 0 elsewhere."""

    def values(*shape):
        keep = torch.rand(*shape, generator=gen) < 0.3
        soft = (
            torch.ones(shape, dtype=torch.float64) if binary else torch.rand(*shape, generator=gen, dtype=torch.float64)
        )
        return torch.where(keep, soft, 0.0).to(pred.dtype).to(device)

    target = apply_class_layout(values, layout, anchors, pred.shape[1])
    assert target.shape == pred.shape
    return target


def labels_and_scores(pred, gen, device):
    shape = anchor_shape(pred)
    return make_labels(shape, pred.shape[1], gen, device), make_scores(shape, accumulate_dtype(pred.dtype), gen, device)


# Targets of each loss and form, built for a pred: (name, loss call, target maker).
TARGET_FORMS = {
    "focal-labels": (focal_call, lambda pred, layout, anchors, gen, device: labels_and_scores(pred, gen, device)[0]),
    "focal-binary": (focal_call, lambda *a: dense_target(*a, binary=True)),
    "focal-soft": (focal_call, dense_target),
    "varifocal-label-score": (
        varifocal_call,
        lambda pred, layout, anchors, gen, device: labels_and_scores(pred, gen, device),
    ),
    "varifocal-dense": (varifocal_call, dense_target),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", sorted(TARGET_FORMS))
@pytest.mark.parametrize("dtype,case", class_params())
def test_family_layouts_and_sizes(device, form, dtype, case):
    """Reduction "none" returns pred's shape; every element's loss and gradient is compared."""
    layout, anchors, classes = case
    gen = make_generator("family-layout", form, dtype, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    call, make_target = TARGET_FORMS[form]
    target = make_target(pred, layout, anchors, gen, device)
    out, _ = check_parity(call, pred, dict(target=target, reduction="none"), out_dtype=accumulate_dtype(dtype))
    assert out.shape == pred.shape


WEIGHTINGS = ("plain", "anchor_weight", "element_weight", "class_weight", "all_avg_tensor", "avg_float")


def weighting_kwargs(weighting, reduction, pred, gen, device):
    """weight (the anchor's or pred's shape), class_weight and avg_factor keyword arguments;
    None for combinations that are invalid ("sum" with avg_factor)."""
    if "avg" in weighting and reduction == "sum":
        return None
    loss_dtype = accumulate_dtype(pred.dtype)

    def positive(*shape):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2).to(loss_dtype).to(device)

    kwargs = dict(reduction=reduction)
    if weighting in ("anchor_weight", "all_avg_tensor"):
        kwargs["weight"] = positive(*anchor_shape(pred))
    if weighting == "element_weight":
        kwargs["weight"] = positive(*pred.shape)
    if weighting in ("class_weight", "all_avg_tensor"):
        kwargs["class_weight"] = positive(pred.shape[1])
    if weighting == "all_avg_tensor":
        kwargs["avg_factor"] = torch.tensor(5.3, dtype=loss_dtype, device=device)
    if weighting == "avg_float":
        kwargs["avg_factor"] = 3.7
    return kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["focal-labels", "focal-soft", "varifocal-label-score", "varifocal-dense"])
@pytest.mark.parametrize(
    "case", [("contiguous", 13, 80), ("channels_last", (2, 3, 5), 7), ("nchw", (2, 2, 3), 5)], ids=class_case_id
)
@pytest.mark.parametrize("dtype,reduction,weighting", reduction_params(WEIGHTINGS, REDUCTIONS))
def test_family_reductions_and_weights(device, form, case, dtype, reduction, weighting):
    layout, anchors, classes = case
    gen = make_generator("family-reduction", form, case, dtype, reduction, weighting)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    call, make_target = TARGET_FORMS[form]
    kwargs = weighting_kwargs(weighting, reduction, pred, gen, device)
    out, _ = check_parity(
        call,
        pred,
        dict(target=make_target(pred, layout, anchors, gen, device), **kwargs),
        out_dtype=accumulate_dtype(dtype),
    )
    assert out.shape == (pred.shape if reduction == "none" else ())


def away_from_zero_base(pred, target, form, activated):
    """For exponents below 2 the weight's derivative holds |m|^(e - 1) (and below 1 it is not
    defined at m = 0): keep m = p - t (varifocal) or 1 - p_t (focal) at least 0.01 from 0, as
    test_parity_qfl.py does, by moving a soft target away from p. Binary and label targets
    give m = p or 1 - p, away from 0 for the logits and probabilities the tests draw."""
    p = pred.double() if activated else torch.sigmoid(pred.double())
    if form in ("focal-soft", "varifocal-dense"):
        t = target.double()
        m = p * (1 - 2 * t) + t if form == "focal-soft" else p - t
        shifted = torch.where(p < 0.5, t + 0.03, t - 0.03).clamp(0, 1)
        target = torch.where((m.abs() < 0.01) & (t > 0), shifted, t).to(target.dtype)
    return target


@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("form", sorted(TARGET_FORMS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_family_exponents_and_probabilities(dtype, form, exponent, activated):
    """gamma in the closed forms (0, 1, 1.5, 2) and pow (2.5), on logits and probabilities."""
    gen = make_generator("family-exponent", dtype, form, exponent, activated)
    pred = make_class_pred("nchw", (2, 3, 4), 5, dtype, "cpu", gen, activated=activated)
    call, make_target = TARGET_FORMS[form]
    target = make_target(pred, "nchw", (2, 3, 4), gen, "cpu")
    if isinstance(target, torch.Tensor):
        target = away_from_zero_base(pred, target, form, activated)
    check_parity(
        call,
        pred,
        dict(target=target, gamma=exponent, activated=activated, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )


@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0, -1.0, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_focal_alpha(dtype, alpha):
    """alpha_t = alpha t + (1 - alpha)(1 - t); None or negative: no alpha weighting."""
    gen = make_generator("focal-alpha", dtype, alpha)
    pred = make_class_pred("contiguous", 11, 6, dtype, "cpu", gen)
    target = dense_target(pred, "contiguous", 11, gen, "cpu")
    check_parity(
        focal_call, pred, dict(target=target, alpha=alpha, reduction="none"), out_dtype=accumulate_dtype(dtype)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("iou_weighted", [True, False], ids=["iou_weighted", "unweighted"])
@pytest.mark.parametrize("detach_weight", [False, True], ids=["mmdet", "detached"])
@pytest.mark.parametrize("form", ["varifocal-label-score", "varifocal-dense"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_varifocal_weighting_and_detach(device, dtype, form, detach_weight, iou_weighted):
    gen = make_generator("varifocal-flags", dtype, form, detach_weight, iou_weighted)
    pred = make_class_pred("channels_last", (2, 3, 5), 7, dtype, device, gen)
    call, make_target = TARGET_FORMS[form]
    inputs = dict(
        target=make_target(pred, "channels_last", (2, 3, 5), gen, device),
        alpha=0.6,
        gamma=1.5,
        iou_weighted=iou_weighted,
        detach_weight=detach_weight,
        reduction="sum",
    )
    check_parity(call, pred, inputs, out_dtype=accumulate_dtype(dtype))


def test_varifocal_positives_follow_the_target_form():
    """A labelled class of score 0 is a positive in the (label, score) form (weight t = 0: no
    loss, no gradient) and a negative in the dense form (t = 0 is not > 0)."""
    pred = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    label, score = torch.tensor([1]), torch.tensor([0.0], dtype=torch.float64)
    dense = torch.zeros(1, 3, dtype=torch.float64)
    by_label = gfl_ops.varifocal_loss(pred, (label, score), reduction="none", backend="native")
    by_dense = gfl_ops.varifocal_loss(pred, dense, reduction="none", backend="native")
    assert by_label[0, 1] == 0.0
    sigma = torch.sigmoid(pred.detach()[0, 1])
    negative_loss = 0.75 * sigma**2 * torch.nn.functional.softplus(pred.detach()[0, 1])
    torch.testing.assert_close(by_dense[0, 1], negative_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(by_label[0, [0, 2]], by_dense[0, [0, 2]], rtol=0, atol=0)
    (grad,) = torch.autograd.grad(by_label.sum(), pred)
    assert grad[0, 1] == 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["label_score", "dense"])
def test_qfl_class_weight(dtype, form):
    """QFL's class_weight, both target forms, on a layout of each walk."""
    gen = make_generator("qfl-class-weight", dtype, form)
    for layout, anchors in (("contiguous", 9), ("nchw", (2, 2, 3)), ("sliced", 6)):
        pred = make_class_pred(layout, anchors, 5, dtype, "cpu", gen)
        class_weight = (torch.rand(5, generator=gen, dtype=torch.float64) * 2).to(accumulate_dtype(dtype))
        if form == "dense":
            call = lambda p, *, backend, **kw: gfl_ops.quality_focal_loss_dense(p, backend=backend, **kw)  # noqa: E731
            inputs = dict(target=dense_target(pred, layout, anchors, gen, "cpu"))
        else:
            call = lambda p, *, backend, **kw: gfl_ops.quality_focal_loss(p, backend=backend, **kw)  # noqa: E731
            label, score = labels_and_scores(pred, gen, "cpu")
            inputs = dict(label=label, score=score)
        check_parity(
            call, pred, dict(class_weight=class_weight, reduction="none", **inputs), out_dtype=accumulate_dtype(dtype)
        )


def test_class_weight_scales_each_class():
    """class_weight c multiplies class c's term exactly: the loss of a one-hot class weight
    is that class's term alone."""
    gen = make_generator("class-weight-one-hot")
    pred = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    target = torch.rand(8, 4, generator=gen, dtype=torch.float64)
    every = gfl_ops.sigmoid_focal_loss(pred, target, reduction="none", backend="native")
    for c in range(4):
        one_hot = torch.zeros(4, dtype=torch.float64)
        one_hot[c] = 3.0
        only_c = gfl_ops.sigmoid_focal_loss(pred, target, class_weight=one_hot, reduction="sum", backend="native")
        torch.testing.assert_close(only_c, 3.0 * every[:, c].sum(), rtol=1e-14, atol=0)
        qfl = gfl_ops.quality_focal_loss_dense(pred, target, class_weight=one_hot, reduction="none", backend="native")
        x, t = pred[:, c], target[:, c]  # QFL of class c alone: |sigma - t|^2 BCE
        term = (torch.sigmoid(x) - t) ** 2 * torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, reduction="none"
        )
        torch.testing.assert_close(qfl, 3.0 * term, rtol=1e-13, atol=0)


@pytest.mark.parametrize("mal_alpha", [None, 0.75])
def test_deims_matchability_aware_loss_is_a_varifocal_configuration(mal_alpha):
    """DEIM's matchability-aware loss (deim_criterion.py, loss_labels_mal, as DEIM writes it):

        target_score = (onehot * ious) ** gamma
        weight = mal_alpha * sigmoid(x).detach() ** gamma * (1 - onehot) + onehot   (alpha 1 if None)
        loss = BCE_with_logits(x, target_score, weight=weight, reduction="none")

    is varifocal_loss with the scores raised to gamma, iou_weighted=False and detach_weight=True."""
    gen = make_generator("deim-mal", mal_alpha)
    gamma = 1.5
    logits = torch.randn(4, 9, 6, generator=gen, dtype=torch.float64)  # (B, queries, C)
    label = torch.randint(0, 7, (4, 9), generator=gen)  # 6 = no object
    ious = torch.rand(4, 9, generator=gen, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(label, 7)[..., :6].double()
    target_score = (onehot * ious[..., None]) ** gamma
    pred_score = torch.sigmoid(logits).detach()
    weight = (1.0 if mal_alpha is None else mal_alpha) * pred_score**gamma * (1 - onehot) + onehot
    leaf = logits.clone().requires_grad_()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(leaf, target_score, weight=weight, reduction="none")
    pred = logits.permute(0, 2, 1).clone().requires_grad_()  # classes in dimension 1
    loss = gfl_ops.varifocal_loss(
        pred,
        (label, ious**gamma),
        alpha=1.0 if mal_alpha is None else mal_alpha,
        gamma=gamma,
        iou_weighted=False,
        detach_weight=True,
        reduction="none",
        backend="native",
    )
    torch.testing.assert_close(loss.permute(0, 2, 1), expected, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    (grad_expected,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(grad.permute(0, 2, 1), grad_expected, rtol=1e-12, atol=1e-15)
