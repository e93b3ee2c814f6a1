"""Quality Focal Loss, backend="native" against the float64 reference: values and gradients.

Both target forms: (label, score) (gfl_ops.quality_focal_loss) and a dense soft target
(gfl_ops.quality_focal_loss_dense). Axes: dtype x layout x odd sizes (reduction "none",
so every per-anchor value is compared), dtype x reduction x weight/avg_factor, and
beta x activated (probability input) x background labels.
"""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops
from _helpers import (
    away_from_probability,
    assert_parity_relative,
    class_params,
    DEVICES,
    FLOAT_DTYPES,
    WEIGHTINGS,
    accumulate_dtype,
    anchor_shape,
    apply_class_layout,
    check_parity,
    class_case_id,
    dtype_id,
    make_class_pred,
    make_generator,
    make_labels,
    make_scores,
    weighting_kwargs,
)

BETAS = (0.0, 0.5, 1.5, 2.0, 3.0)
REDUCTIONS = ("none", "mean", "sum")


def qfl_call(pred, *, backend, label, score, **kwargs):
    return gfl_ops.quality_focal_loss(pred, label, score, backend=backend, **kwargs)


def qfl_dense_call(pred, *, backend, target, **kwargs):
    return gfl_ops.quality_focal_loss_dense(pred, target, backend=backend, **kwargs)


def label_inputs(pred, gen, device, positive_fraction=0.5):
    shape = anchor_shape(pred)
    label = make_labels(shape, pred.shape[1], gen, device, positive_fraction)
    score = make_scores(shape, accumulate_dtype(pred.dtype), gen, device)
    return label, score


def dense_target(pred, layout, anchors, gen, device, target_layout="same"):
    """Soft targets in [0, 1], about 30% non-zero, in pred's dtype."""

    def values(*shape):
        soft = torch.rand(*shape, generator=gen, dtype=torch.float64)
        keep = torch.rand(*shape, generator=gen) < 0.3
        return torch.where(keep, soft, 0.0).to(pred.dtype).to(device)

    if target_layout == "same":
        target = apply_class_layout(values, layout, anchors, pred.shape[1])
    else:
        target = apply_class_layout(values, layout, anchors, pred.shape[1]).contiguous()
    assert target.shape == pred.shape
    return target


def probability(pred, activated):
    return pred.double() if activated else torch.sigmoid(pred.double())


def assert_modulating_factor_nonzero(pred, target_dense, activated):
    """For beta < 1 the factor |d|^beta has no derivative at d = 0: keep the inputs away from it."""
    assert bool(((probability(pred, activated) - target_dense.double()).abs() > 1e-6).all())


# --------------------------------------------------------------------------------------
# (label, score)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,case", class_params())
def test_qfl_layouts_and_sizes(device, dtype, case):
    layout, anchors, classes = case
    gen = make_generator("qfl-layout", dtype, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    label, score = label_inputs(pred, gen, device)
    check_parity(
        qfl_call,
        pred,
        dict(label=label, score=score, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )


REDUCTION_CASES = [("contiguous", 13, 80), ("channels_last", (2, 3, 5), 7)]


def _reduction_params():
    params = []
    for dtype in FLOAT_DTYPES:
        for reduction in REDUCTIONS:
            for weighting in WEIGHTINGS:
                if reduction == "sum" and "avg" in weighting:
                    continue  # an error, tested in test_errors.py
                params.append(
                    pytest.param(dtype, reduction, weighting, id=f"{dtype_id(dtype)}-{reduction}-{weighting}")
                )
    return params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REDUCTION_CASES, ids=class_case_id)
@pytest.mark.parametrize("dtype,reduction,weighting", _reduction_params())
def test_qfl_reductions_weights_avg_factor(device, dtype, reduction, weighting, case):
    layout, anchors, classes = case
    gen = make_generator("qfl-reduction", dtype, reduction, weighting, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    label, score = label_inputs(pred, gen, device)
    kwargs = weighting_kwargs(weighting, reduction, label.shape, accumulate_dtype(dtype), gen, device)
    out, _ = check_parity(qfl_call, pred, dict(label=label, score=score, **kwargs), out_dtype=accumulate_dtype(dtype))
    assert out.shape == (label.shape if reduction == "none" else ())


@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout,anchors,classes", [("contiguous", 13, 7), ("nchw", (2, 3, 4), 5)])
def test_qfl_beta_and_activated(dtype, beta, activated, layout, anchors, classes):
    gen = make_generator("qfl-beta", dtype, beta, activated, layout)
    pred = make_class_pred(layout, anchors, classes, dtype, "cpu", gen, activated=activated)
    label, score = label_inputs(pred, gen, "cpu")
    if beta < 2:  # see away_from_probability
        in_range = (label >= 0) & (label < classes)
        p_label = probability(pred, activated).gather(1, torch.where(in_range, label, 0).unsqueeze(1)).squeeze(1)
        score = torch.where(in_range, away_from_probability(p_label, score.double()), score.double()).to(score.dtype)
    if beta < 1:
        target = gfl_ops.reference.dense_target_from_labels(pred, label, score)
        assert_modulating_factor_nonzero(pred, target, activated)
    check_parity(
        qfl_call,
        pred,
        dict(label=label, score=score, beta=beta, activated=activated, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )


@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_qfl_all_background_rows(dtype, activated):
    """Background rows (label C, -1, huge) have target 0 on every class: sum_c |p|^beta BCE(x, 0)."""
    gen = make_generator("qfl-background", dtype, activated)
    num_classes = 6
    pred = make_class_pred("contiguous", 9, num_classes, dtype, "cpu", gen, activated=activated)
    label = torch.tensor([num_classes, -1, num_classes, 10**9, -(10**9), num_classes + 1, -2, num_classes, -1])
    score = make_scores((9,), accumulate_dtype(dtype), gen, "cpu")
    loss, _ = check_parity(
        qfl_call,
        pred,
        dict(label=label, score=score, activated=activated, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )
    # Independent formula in float64.
    x = pred.double()
    zeros = torch.zeros_like(x)
    if activated:
        expected = (x.pow(2) * F.binary_cross_entropy(x, zeros, reduction="none")).sum(1)
    else:
        expected = (torch.sigmoid(x).pow(2) * F.binary_cross_entropy_with_logits(x, zeros, reduction="none")).sum(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The score of a background anchor plays no part.
    other = gfl_ops.quality_focal_loss(
        pred,
        label,
        torch.rand(9, generator=gen).to(score.dtype),
        reduction="none",
        activated=activated,
        backend="native",
    )
    assert torch.equal(other, loss)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_qfl_mixed_positive_and_background_rows(dtype):
    """Half the rows all-background, half positive, in one batch; beta=2 (the kernel's fast path)."""
    gen = make_generator("qfl-mixed", dtype)
    pred = make_class_pred("contiguous", 16, 5, dtype, "cpu", gen)
    label = torch.tensor([5, 0, -1, 4, 5, 2, 5, 3] * 2)
    score = make_scores((16,), accumulate_dtype(dtype), gen, "cpu")
    check_parity(
        qfl_call,
        pred,
        dict(label=label, score=score, reduction="mean", avg_factor=5.0),
        out_dtype=accumulate_dtype(dtype),
    )


# --------------------------------------------------------------------------------------
# Dense soft target
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_layout", ["same", "contiguous"])
@pytest.mark.parametrize("dtype,case", class_params())
def test_qfl_dense_layouts_and_sizes(device, dtype, case, target_layout):
    layout, anchors, classes = case
    gen = make_generator("dense-layout", dtype, case, target_layout)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    target = dense_target(pred, layout, anchors, gen, device, target_layout)
    check_parity(
        qfl_dense_call,
        pred,
        dict(target=target, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REDUCTION_CASES, ids=class_case_id)
@pytest.mark.parametrize("dtype,reduction,weighting", _reduction_params())
def test_qfl_dense_reductions_weights_avg_factor(device, dtype, reduction, weighting, case):
    layout, anchors, classes = case
    gen = make_generator("dense-reduction", dtype, reduction, weighting, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    target = dense_target(pred, layout, anchors, gen, device)
    kwargs = weighting_kwargs(weighting, reduction, anchor_shape(pred), accumulate_dtype(dtype), gen, device)
    check_parity(qfl_dense_call, pred, dict(target=target, **kwargs), out_dtype=accumulate_dtype(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("layout", ["contiguous", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_qfl_dense_float32_target_of_half_logits(device, dtype, layout, reduction):
    """AMP: half logits, float32 soft targets, read at their own precision (not rounded to
    pred's dtype), as the reference reads them."""
    gen = make_generator("dense-amp", dtype, layout, reduction)
    anchors = (2, 3, 5) if layout != "contiguous" else 13
    pred = make_class_pred(layout, anchors, 7, dtype, device, gen)
    target = dense_target(pred.float(), layout, anchors, gen, device)
    assert target.dtype == torch.float32
    check_parity(qfl_dense_call, pred, dict(target=target, reduction=reduction), out_dtype=torch.float32)


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
def test_qfl_dense_float32_target_is_not_copied(gradient_pass, set_gradient_pass):
    """A float32 target of bfloat16 logits costs no N x C conversion: the step allocates the
    gradient (bfloat16) and nothing of the target's size (in the backward gradient pass, a
    per-anchor float32 factor besides: see test_bench_harness.py)."""
    from gfl_ops import bench

    set_gradient_pass("cpu", gradient_pass)
    gen = make_generator("dense-amp-copy")
    pred = torch.randn(4096, 80, generator=gen).to(torch.bfloat16).requires_grad_()
    target = torch.rand(4096, 80, generator=gen)

    def step():
        gfl_ops.quality_focal_loss_dense(pred, target, backend="native").backward()

    step()
    pred.grad = None
    peak = bench.peak_extra_bytes(step, torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler does not report CPU allocations")
    gradient = pred.numel() * pred.element_size()
    factor = pred.shape[0] * 4 if gradient_pass == "backward" else 0
    assert gradient + factor <= peak <= gradient + factor + 64, peak - gradient - factor


@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_qfl_dense_beta_and_activated(dtype, beta, activated):
    gen = make_generator("dense-beta", dtype, beta, activated)
    pred = make_class_pred("channels_last", (2, 3, 4), 5, dtype, "cpu", gen, activated=activated)
    target = dense_target(pred, "channels_last", (2, 3, 4), gen, "cpu")
    if beta < 2:  # see away_from_probability
        target = away_from_probability(probability(pred, activated), target.double()).to(dtype)
    if beta < 1:
        assert_modulating_factor_nonzero(pred, target, activated)
    check_parity(
        qfl_dense_call,
        pred,
        dict(target=target, beta=beta, activated=activated, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout,anchors", [("contiguous", 11), ("nchw", (2, 3, 4)), ("channels_last", (2, 3, 4))])
def test_qfl_dense_target_from_labels_equals_label_form(dtype, layout, anchors):
    """The dense op on the (label, score) target equals the label op (both native)."""
    gen = make_generator("dense-vs-label", dtype, layout)
    pred = make_class_pred(layout, anchors, 9, dtype, "cpu", gen).requires_grad_()
    label, score = label_inputs(pred, gen, "cpu")
    # Built by hand (not with gfl_ops.reference): one-hot of the label, times the score.
    in_range = (label >= 0) & (label < 9)
    one_hot = F.one_hot(torch.where(in_range, label, 0), 9).movedim(-1, 1).to(dtype)
    target = one_hot * (score * in_range).unsqueeze(1).to(dtype)
    a = gfl_ops.quality_focal_loss(pred, label, score, reduction="none", backend="native")
    (ga,) = torch.autograd.grad(a.sum(), pred)
    b = gfl_ops.quality_focal_loss_dense(pred, target, reduction="none", backend="native")
    (gb,) = torch.autograd.grad(b.sum(), pred)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_qfl_dense_target_of_a_third_dtype_is_read_as_float32():
    """A float64 (or bfloat16) target with float16 pred behaves as target.float(): the
    kernels read pred's dtype and float32, and the maths is float32."""
    gen = make_generator("dense-cast")
    pred = make_class_pred("contiguous", 7, 5, torch.float16, "cpu", gen)
    target64 = torch.rand(7, 5, generator=gen, dtype=torch.float64) * (torch.rand(7, 5, generator=gen) < 0.5)
    expected = gfl_ops.quality_focal_loss_dense(pred, target64.float(), reduction="none", backend="native")
    for target in (target64, target64.bfloat16()):
        got = gfl_ops.quality_focal_loss_dense(pred, target, reduction="none", backend="native")
        assert torch.equal(
            got, gfl_ops.quality_focal_loss_dense(pred, target.float(), reduction="none", backend="native")
        )
    assert not torch.equal(
        expected, gfl_ops.quality_focal_loss_dense(pred, target64.half(), reduction="none", backend="native")
    )


# --------------------------------------------------------------------------------------
# The per-anchor sum over many classes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,dtype,grad",
    [
        # The CPU kernel's walks: rows (class stride 1; vectorised or not) and channel-first
        # planes, with and without the gradient.
        pytest.param("contiguous", torch.float32, False, id="rows-float32"),
        pytest.param("contiguous", torch.float32, True, id="rows-float32-grad"),
        pytest.param("contiguous", torch.float16, False, id="rows-float16"),
        pytest.param("contiguous", torch.bfloat16, True, id="rows-bfloat16-grad"),
        pytest.param("channels_last", torch.float16, True, id="rows-channels-last-float16-grad"),
        pytest.param("nchw", torch.float32, False, id="planes-float32"),
        pytest.param("nchw", torch.float64, True, id="planes-float64-grad"),
        pytest.param("transposed", torch.float32, True, id="planes-transposed-float32-grad"),
    ],
)
def test_qfl_class_sum_accuracy_many_classes(layout, dtype, grad):
    """LVIS-sized C = 1203 over 48 anchors: the per-anchor sum over classes stays within the
    parity bound in every walk (a sequential float32 sum was about 10x the reference's error)."""
    anchors = 48 if layout in ("contiguous", "transposed") else (2, 4, 6)
    gen = make_generator("class-sum", layout, dtype, grad)
    pred = make_class_pred(layout, anchors, 1203, dtype, "cpu", gen)
    label, score = label_inputs(pred, gen, "cpu")
    check_parity(
        qfl_call,
        pred,
        dict(label=label, score=score, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
        grad=grad,
    )


# --------------------------------------------------------------------------------------
# Probability input (activated=True): element accuracy where the kernel's formulas lose it
# --------------------------------------------------------------------------------------


def _relative_parity(pred, target, beta):
    """Per-element QFL (C = 1) of the native dense op against the reference, relative errors."""
    native = gfl_ops.quality_focal_loss_dense(
        pred, target, beta=beta, activated=True, reduction="none", backend="native"
    )
    low = gfl_ops.reference.quality_focal_loss_dense(pred, target, beta=beta, activated=True, reduction="none")
    exact = gfl_ops.reference.quality_focal_loss_dense(
        pred.double(), target.double(), beta=beta, activated=True, reduction="none"
    )
    assert_parity_relative("value", native, exact, low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_qfl_activated_background_small_probabilities(dtype):
    """Background elements (y = 0) of small probability: BCE_p = -log1p(-p), beta = 0, where
    log(1 - p) would lose the relative accuracy (1 - p rounds to 1 below p ~ 6e-8)."""
    p = torch.logspace(-7, -2, 48, dtype=torch.float64).to(dtype)[:, None]
    _relative_parity(p, torch.zeros_like(p), beta=0.0)


@pytest.mark.parametrize("beta", [1.5, 2.0, 3.0])
def test_qfl_modulating_factor_near_zero_difference(beta):
    """Positives with y = 1 and p just below 1: d = p - 1 is exact, |d| spans 1e-6..1e-1
    and BCE_p = -log p is accurate, so the error is the factor's: |d|^beta computed as
    exp(beta log|d|) in float32 would be off by |beta log|d|| eps (~4e-6 at beta = 3)."""
    p = (1 - torch.logspace(-6, -1, 48, dtype=torch.float64)).float()[:, None]
    _relative_parity(p, torch.ones_like(p), beta)


def test_qfl_activated_moderate_probabilities_relative_accuracy():
    """p in [0.5, 0.99], beta = 2: the relative accuracy is the reference's."""
    gen = make_generator("activated-relative")
    p = (0.5 + 0.49 * torch.rand(64, 1, generator=gen, dtype=torch.float64)).float()
    y = torch.rand(64, 1, generator=gen).float()
    _relative_parity(p, y, beta=2.0)
