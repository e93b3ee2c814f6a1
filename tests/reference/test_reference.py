"""The oracle itself (gfl_ops.reference) against closed forms written out here in float64,
against mmdetection's formulas, and against backend="native" where the kernels define a
convention (docs/MATH.md):

- labels of every integer dtype mean what label.long() means (outside [0, C): background);
- the modulating factor |d|^beta has derivative 0 at d = 0 for every beta (finite for
  beta < 1, where autograd of abs().pow(beta) gives inf * 0 = NaN) and value 0^beta;
- probability input (activated=True) uses the BCE of csrc/gfl_math.h with torch's
  backward formula and no range check: NaN for probabilities outside [0, 1], the extended
  formula for scores outside [0, 1], as the kernels compute them.
"""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops
from gfl_ops import reference
from _helpers import dtype_id, make_generator

BETAS = (0.0, 0.5, 1.0, 1.5, 2.0)
INTEGER_DTYPES = (
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
)


@pytest.fixture(params=["forward", "backward"])
def gradient_pass(request, set_gradient_pass):
    """backend="native" with its gradient computed in the forward or in the backward pass."""
    set_gradient_pass("cpu", request.param)
    return request.param


def value_and_grad(fn, pred):
    leaf = pred.detach().requires_grad_()
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def dense_target(label, score, num_classes):
    """The QFL target of (label, score), built one anchor at a time in Python from label.long()."""
    target = torch.zeros(label.numel(), num_classes, dtype=torch.float64)
    for row, lab in enumerate(label.long().tolist()):
        if 0 <= lab < num_classes:
            target[row, lab] = score[row]
    return target


# --------------------------------------------------------------------------------------
# Labels of every integer dtype
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", INTEGER_DTYPES, ids=str)
def test_labels_of_every_integer_dtype_mean_what_long_gives(label_dtype):
    """uint16/uint32/uint64 too (torch refuses to compare them with int64): the target is
    the one of label.long(), so the largest uint64 values (negative as int64) are background."""
    num_classes = 5
    info = torch.iinfo(label_dtype)
    values = [0, 4, num_classes, num_classes + 1, 2, 3, info.max, max(info.min, -1)]
    label = torch.tensor(values, dtype=torch.uint64 if label_dtype == torch.uint64 else torch.int64).to(label_dtype)
    gen = make_generator("reference-labels", label_dtype)
    pred = torch.randn(len(values), num_classes, generator=gen, dtype=torch.float64)
    score = torch.rand(len(values), generator=gen, dtype=torch.float64)
    expected_target = dense_target(label, score, num_classes)

    assert torch.equal(reference.dense_target_from_labels(pred, label, score), expected_target)
    loss, grad = value_and_grad(lambda p: reference.quality_focal_loss_per_anchor(p, label, score), pred)
    expected_loss, expected_grad = value_and_grad(
        lambda p: reference.quality_focal_loss_dense_per_anchor(p, expected_target), pred
    )
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # The public function on both backends (the native one converts with label.long()).
    for backend in ("reference", "native"):
        loss, grad = value_and_grad(
            lambda p: gfl_ops.quality_focal_loss(p, label, score, reduction="none", backend=backend), pred
        )
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_labels_of_channel_first_pred(label_dtype):
    """(B, C, H, W) pred with (B, H, W) labels: class dimension 1 whatever the label dtype."""
    gen = make_generator("reference-labels-nchw", label_dtype)
    pred = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    label64 = torch.randint(0, 5, (2, 2, 2), generator=gen)  # 3 and 4 are background
    score = torch.rand(2, 2, 2, generator=gen, dtype=torch.float64)
    expected = reference.quality_focal_loss_per_anchor(pred, label64, score)
    actual = reference.quality_focal_loss_per_anchor(pred, label64.to(label_dtype), score)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# The modulating factor at d = 0
# --------------------------------------------------------------------------------------


def closed_form_qfl(probability, y, bce, dbce_dpred, dprobability_dpred, beta):
    """Per element, in float64: loss = factor * BCE and
    dloss/dpred = factor * dBCE/dpred + BCE * dfactor/dd * dprobability/dpred with
    factor = |d|^beta (0^beta = 1 for beta = 0, else 0) and dfactor/dd = beta |d|^(beta-1) sign(d),
    0 at d = 0."""
    d = probability - y
    magnitude = d.abs()
    at_zero = magnitude == 0
    safe = torch.where(at_zero, 1.0, magnitude)
    factor = torch.where(at_zero, 0.0**beta, safe**beta)
    dfactor_dd = torch.where(at_zero, 0.0, beta * safe ** (beta - 1) * torch.sign(d))
    return factor * bce, factor * dbce_dpred + bce * dfactor_dd * dprobability_dpred


def logits_with_sigma_equal_to_target():
    """Logits and a dense target with sigma(x) == y exactly (x = 0, y = 0.5) on two positives
    and, in the dense target only, on one background class; labels/scores of the positives."""
    gen = make_generator("reference-d-zero-logits")
    pred = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    label = torch.tensor([0, 3, 4, 1, 2, -1])
    score = torch.rand(6, generator=gen, dtype=torch.float64)
    score[:3] = 0.5
    pred[0, 0] = pred[1, 3] = 0.0  # positives with sigma == score
    target = dense_target(label, score, 4)
    target[3, 2] = 0.5  # dense form only: sigma == y on a background class
    pred[3, 2] = 0.0
    return pred, target, label, score


def probabilities_with_p_equal_to_target():
    """Probabilities equal to their targets (p == y) on positives, p = 0 on background."""
    gen = make_generator("reference-d-zero-probabilities")
    pred = 0.05 + 0.9 * torch.rand(6, 4, generator=gen, dtype=torch.float64)
    label = torch.tensor([0, 3, 2, 1, 4, -1])
    score = torch.rand(6, generator=gen, dtype=torch.float64)
    score[3] = 1.0
    for row in range(4):
        pred[row, label[row]] = score[row]  # p == y, including p = y = 1
    pred[4, 1] = pred[5, 0] = 0.0  # background: p = y = 0
    return pred, dense_target(label, score, 4), label, score


@pytest.mark.parametrize("beta", BETAS)
def test_logits_gradient_at_sigma_equal_to_target(beta, gradient_pass):
    """beta < 1 gave NaN gradients where sigma == y: dfactor/dd is 0 there, as in the kernels."""
    pred, target, label, score = logits_with_sigma_equal_to_target()
    sigma = torch.sigmoid(pred)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    element_loss, element_grad = closed_form_qfl(sigma, target, bce, sigma - target, sigma * (1 - sigma), beta)
    expected_loss = element_loss.sum(1)

    loss, grad = value_and_grad(lambda p: reference.quality_focal_loss_dense_per_anchor(p, target, beta), pred)
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, element_grad, rtol=1e-12, atol=1e-14)

    label_target = dense_target(label, score, 4)
    label_bce = F.binary_cross_entropy_with_logits(pred, label_target, reduction="none")
    label_loss, label_grad = closed_form_qfl(
        sigma, label_target, label_bce, sigma - label_target, sigma * (1 - sigma), beta
    )
    for backend in ("reference", "native"):
        loss, grad = value_and_grad(
            lambda p: gfl_ops.quality_focal_loss(p, label, score, beta=beta, reduction="none", backend=backend), pred
        )
        torch.testing.assert_close(loss, label_loss.sum(1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, label_grad, rtol=1e-12, atol=1e-14)
        loss, grad = value_and_grad(
            lambda p: gfl_ops.quality_focal_loss_dense(p, target, beta=beta, reduction="none", backend=backend), pred
        )
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, element_grad, rtol=1e-12, atol=1e-14)


def probability_bce_closed_form(p, y):
    """BCE_p with torch's -100 log clamp, and torch's backward formula (p - y) / max(p (1 - p), 1e-12)."""
    bce = -(y * torch.log(p).clamp_min(-100) + (1 - y) * torch.log1p(-p).clamp_min(-100))
    return bce, (p - y) / (p * (1 - p)).clamp_min(1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_probability_gradient_at_p_equal_to_target(beta, gradient_pass):
    pred, target, label, score = probabilities_with_p_equal_to_target()
    bce, dbce_dp = probability_bce_closed_form(pred, target)
    element_loss, element_grad = closed_form_qfl(pred, target, bce, dbce_dp, torch.ones_like(pred), beta)
    for backend in ("reference", "native"):
        for fn in (
            lambda p: gfl_ops.quality_focal_loss(
                p, label, score, beta=beta, activated=True, reduction="none", backend=backend
            ),
            lambda p: gfl_ops.quality_focal_loss_dense(
                p, target, beta=beta, activated=True, reduction="none", backend=backend
            ),
        ):
            loss, grad = value_and_grad(fn, pred)
            assert torch.isfinite(grad).all(), (backend, grad)
            torch.testing.assert_close(loss, element_loss.sum(1), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad, element_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0, 0.0, 0.5, 2])
def test_modulating_factor_value_at_zero_is_torch_pow(beta):
    """The factor at d = 0 is torch.pow(0, beta): 1 for beta = 0, 0 otherwise; elsewhere |d|^beta."""
    d = torch.tensor([0.0, -0.0, 0.25, -0.5], dtype=torch.float64)
    expected = torch.pow(d.abs(), beta)
    torch.testing.assert_close(reference.modulating_factor(d, beta), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Probability input: torch's BCE formulas without the range check
# --------------------------------------------------------------------------------------


def mmdet_quality_focal_loss_with_prob(pred, label, score, beta):
    """mmdetection 3.3.0's quality_focal_loss_with_prob (mmdet/models/losses/gfocal_loss.py),
    unreduced: F.binary_cross_entropy against 0 everywhere, then the positives overwritten."""
    pred_sigmoid = pred
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def probability_inputs(gen, anchors=10, num_classes=6):
    pred = 0.02 + 0.96 * torch.rand(anchors, num_classes, generator=gen, dtype=torch.float64)
    label = torch.randint(0, num_classes + 2, (anchors,), generator=gen)  # C, C + 1: background
    score = torch.rand(anchors, generator=gen, dtype=torch.float64)
    return pred, label, score


@pytest.mark.parametrize("beta", BETAS)
def test_probability_input_in_range_equals_mmdetection(beta):
    pred, label, score = probability_inputs(make_generator("reference-mmdet-prob", beta))
    expected_loss, expected_grad = value_and_grad(
        lambda p: mmdet_quality_focal_loss_with_prob(p, label, score, beta), pred
    )
    loss, grad = value_and_grad(
        lambda p: reference.quality_focal_loss_per_anchor(p, label, score, beta, activated=True), pred
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("beta", [1.5, 2.0])
def test_probability_input_at_the_ends_of_the_range(beta, gradient_pass):
    """p = 0, p = 1 and p below exp(-100): the clamped logs in the loss, and in the gradient
    torch's (p - y) / max(p (1 - p), 1e-12) (1e12-sized where p (1 - p) = 0), which is not
    autograd of the clamped expression (that gives NaN or 0 there), in the reference as in
    the kernels. mmdetection's formula agrees to 4e-9 where the clamp acts: torch's
    constant is float32's 1e-12 (9.99999996e-13) in float64 too, the kernels' 1e-12."""
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    score = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.3, 1.0], dtype=torch.float64)
    pred = torch.tensor(
        [
            [0.0, 1.0, 1e-50],
            [1.0, 0.0, 1e-7],
            [1e-50, 1.0 - 1e-7, 1.0],
            [1.0, 1e-300, 0.5],
            [0.0, 1.0, 1.0],
            [0.3, 1e-50, 0.0],
        ],
        dtype=torch.float64,
    )
    target = dense_target(label, score, 3)
    bce, dbce_dp = probability_bce_closed_form(pred, target)
    element_loss, element_grad = closed_form_qfl(pred, target, bce, dbce_dp, torch.ones_like(pred), beta)
    assert element_grad.abs().max() > 1e11  # the 1e-12 clamp is exercised
    mmdet_loss, mmdet_grad = value_and_grad(lambda p: mmdet_quality_focal_loss_with_prob(p, label, score, beta), pred)
    torch.testing.assert_close(element_loss.sum(1), mmdet_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(element_grad, mmdet_grad, rtol=1e-8, atol=1e-13)
    for backend in ("reference", "native"):
        loss, grad = value_and_grad(
            lambda p: gfl_ops.quality_focal_loss(
                p, label, score, beta=beta, activated=True, reduction="none", backend=backend
            ),
            pred,
        )
        torch.testing.assert_close(loss, element_loss.sum(1), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, element_grad, rtol=1e-13, atol=1e-13)


def assert_same_nan_and_values(actual, expected, rtol, atol):
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    keep = ~torch.isnan(expected)
    torch.testing.assert_close(actual[keep], expected[keep], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("beta", BETAS)
def test_probabilities_outside_the_range_give_nan_in_every_backend(dtype, beta, gradient_pass):
    """p < 0 or p > 1: the loss of the anchor and the gradient of the element are NaN (a log
    of a negative number), in the reference as in the kernels; everything else is unchanged."""
    pred, label, score = probability_inputs(make_generator("reference-prob-out", beta))
    label[0], label[5] = 1, 2  # out-of-range probabilities on positive classes too
    outside = torch.tensor([-0.1, 1.2, -1e-3, 1.0 + 1e-6, -5.0], dtype=torch.float64)
    pred[[0, 2, 2, 5, 7], [1, 0, 4, 2, 3]] = outside
    pred = pred.to(dtype)
    bad_element = (pred < 0) | (pred > 1)
    bad_anchor = bad_element.any(1)
    assert bad_anchor.tolist() == [True, False, True, False, False, True, False, True, False, False]

    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    score = score.to(dtype)
    target = dense_target(label, score.double(), pred.shape[1]).to(dtype)
    calls = {
        "label": lambda p, backend: gfl_ops.quality_focal_loss(
            p, label, score, beta=beta, activated=True, reduction="none", backend=backend
        ),
        "dense": lambda p, backend: gfl_ops.quality_focal_loss_dense(
            p, target, beta=beta, activated=True, reduction="none", backend=backend
        ),
    }
    for name, call in calls.items():
        ref_loss, ref_grad = value_and_grad(lambda p: call(p, "reference"), pred)
        native_loss, native_grad = value_and_grad(lambda p: call(p, "native"), pred)
        assert torch.equal(torch.isnan(ref_loss), bad_anchor), (name, ref_loss)
        assert torch.equal(torch.isnan(ref_grad), bad_element), (name, ref_grad)
        assert_same_nan_and_values(native_loss, ref_loss, rtol, atol)
        assert_same_nan_and_values(native_grad, ref_grad, rtol, atol)
    # In range, the reference's values are those of mmdetection's formula.
    good = ~bad_anchor
    expected = mmdet_quality_focal_loss_with_prob(pred.double()[good], label[good], score.double()[good], beta)
    torch.testing.assert_close(ref_loss[good].double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", BETAS)
def test_scores_outside_the_range_use_the_extended_formula(beta, gradient_pass):
    """Scores such as 1.2 and -0.1 (F.binary_cross_entropy refuses them): the same formula,
    extended, in the reference and the kernels, value and gradient."""
    pred, label, score = probability_inputs(make_generator("reference-score-out", beta))
    label[:4] = torch.tensor([0, 1, 2, 3])
    score[:4] = torch.tensor([1.2, -0.1, 1.5, -1.0], dtype=torch.float64)
    target = dense_target(label, score, pred.shape[1])
    bce, dbce_dp = probability_bce_closed_form(pred, target)
    element_loss, element_grad = closed_form_qfl(pred, target, bce, dbce_dp, torch.ones_like(pred), beta)
    for backend in ("reference", "native"):
        for fn in (
            lambda p: gfl_ops.quality_focal_loss(
                p, label, score, beta=beta, activated=True, reduction="none", backend=backend
            ),
            lambda p: gfl_ops.quality_focal_loss_dense(
                p, target, beta=beta, activated=True, reduction="none", backend=backend
            ),
        ):
            loss, grad = value_and_grad(fn, pred)
            torch.testing.assert_close(loss, element_loss.sum(1), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad, element_grad, rtol=1e-12, atol=1e-14)


def test_probability_bce_target_gradient_is_torchs():
    """The reference differentiates targets too (backend="reference" allows it): with respect
    to y, BCE_p has torch's derivative log(1 - p) - log(p)."""
    gen = make_generator("reference-prob-target-grad")
    p = torch.rand(5, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    y = torch.rand(5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    loss = reference.quality_focal_loss_dense_per_anchor(p, y, beta=0.0, activated=True)
    (grad,) = torch.autograd.grad(loss.sum(), y)
    y_copy = y.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.binary_cross_entropy(p, y_copy, reduction="sum"), y_copy)
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-14)


def test_probability_input_higher_order_and_batched_gradients():
    """The reference is the route to higher-order gradients: double backward (gradgradcheck)
    and a batched backward (vmap: jacobian(vectorize=True), gradcheck's batched check)."""
    gen = make_generator("reference-prob-higher-order")
    pred, label, score = probability_inputs(gen, anchors=4, num_classes=3)
    pred.requires_grad_()
    fn = lambda p: reference.quality_focal_loss_per_anchor(p, label, score, 1.5, activated=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, (pred,))
    batched = torch.autograd.functional.jacobian(fn, pred, vectorize=True)
    looped = torch.autograd.functional.jacobian(fn, pred)
    torch.testing.assert_close(batched, looped)


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def test_compiled_modulating_factor_with_a_symbolic_beta(monkeypatch, tmp_path):
    """torch.compile(dynamic=True) makes beta symbolic after the first recompilation: each
    beta must get its own value and gradient, with inductor's FX graph cache on (its
    default; in a fresh folder). Python's 0.0 ** beta there gave every beta the result of
    the first."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    d = torch.tensor([0.0, 0.25, -0.5, 0.75, -1.0, 0.0, 2.0])
    compiled = torch.compile(
        lambda t, beta: reference.modulating_factor(t, beta).sum(), fullgraph=True, dynamic=True, backend="inductor"
    )
    # The config's own patch(), which restores the setting (monkeypatch would delete it).
    with torch._inductor.config.patch(fx_graph_cache=True):
        for beta in (2.0, 0.5, 0.0):
            value, grad = value_and_grad(lambda t: compiled(t, beta), d)
            expected_value, expected_grad = value_and_grad(lambda t: reference.modulating_factor(t, beta).sum(), d)
            torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activated", [True, False], ids=["activated", "logits"])
def test_reference_traces_in_one_graph(activated):
    """The benchmark's "compile" provider runs torch.compile(fullgraph=True) on the reference:
    the probability BCE's autograd.Function traces, forward and backward."""
    gen = make_generator("reference-compile", activated)
    pred, label, score = probability_inputs(gen, anchors=8, num_classes=5)
    if not activated:
        pred = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    compiled = torch.compile(reference.quality_focal_loss, fullgraph=True, backend="aot_eager")
    kwargs = dict(beta=1.5, activated=activated, avg_factor=3.0)
    loss, grad = value_and_grad(lambda p: compiled(p, label, score, **kwargs), pred)
    expected_loss, expected_grad = value_and_grad(
        lambda p: reference.quality_focal_loss(p, label, score, **kwargs), pred
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
