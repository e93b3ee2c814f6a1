"""Bad input gives a clear error (exception type and message); empty input, NaN/inf logits and
out-of-range labels / targets are handled without crashing; the registered operators called
directly with bad input raise RuntimeError."""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops
from _helpers import FLOAT_DTYPES, accumulate_dtype, dtype_id

OPS = torch.ops.gfl_ops
META = "meta"  # a second device that every machine has


def _qfl_args(n=6, c=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(n, c, generator=gen).to(dtype)
    label = torch.tensor([0, c, 1, -1, 3, 2][:n])
    score = torch.rand(n, generator=gen).to(accumulate_dtype(dtype))
    return pred, label, score


def _dfl_args(m=5, bins=17, dtype=torch.float32):
    gen = torch.Generator().manual_seed(6)
    pred = torch.randn(m, bins, generator=gen).to(dtype)
    target = (torch.rand(m, generator=gen) * (bins - 1)).to(accumulate_dtype(dtype))
    return pred, target


# --------------------------------------------------------------------------------------
# Public API: clear errors
# --------------------------------------------------------------------------------------

QFL_BAD = {
    # name: (kwargs-modifier, exception, message fragment)
    "label_shape": (lambda a: a.update(label=a["label"][:-1]), ValueError, "label must have shape (6,)"),
    "score_shape": (lambda a: a.update(score=a["score"][:, None]), ValueError, "score must have shape (6,)"),
    "weight_shape": (lambda a: a.update(weight=torch.ones(5)), ValueError, "weight must have the loss's shape (6,)"),
    "integer_pred": (
        lambda a: a.update(pred=a["pred"].long()),
        TypeError,
        "pred must be float16, bfloat16, float32 or float64",
    ),
    "bool_pred": (lambda a: a.update(pred=a["pred"] > 0), TypeError, "pred must be float16"),
    "not_a_tensor": (lambda a: a.update(pred=a["pred"].tolist()), TypeError, "pred must be a torch.Tensor"),
    "float_label": (lambda a: a.update(label=a["label"].float()), TypeError, "label must be an integer tensor"),
    "bool_label": (lambda a: a.update(label=a["label"] > 0), TypeError, "label must be an integer tensor"),
    "integer_score": (
        lambda a: a.update(score=torch.ones(6, dtype=torch.long)),
        TypeError,
        "score must be a floating-point",
    ),
    "label_on_meta": (lambda a: a.update(label=a["label"].to(META)), ValueError, "label is on meta but pred is on cpu"),
    "score_on_meta": (lambda a: a.update(score=a["score"].to(META)), ValueError, "score is on meta but pred is on cpu"),
    "weight_on_meta": (
        lambda a: a.update(weight=torch.ones(6, device=META)),
        ValueError,
        "weight is on meta but pred is on cpu",
    ),
    "avg_factor_on_meta": (
        lambda a: a.update(avg_factor=torch.ones(1, device=META)),
        ValueError,
        "avg_factor is on meta",
    ),
    "avg_factor_two_elements": (
        lambda a: a.update(avg_factor=torch.ones(2)),
        ValueError,
        "avg_factor must be a number or a 1-element tensor",
    ),
    "pred_1d": (lambda a: a.update(pred=a["pred"][:, 0]), ValueError, "pred must be (N, C) or (B, C, d1, ..., dk)"),
    "no_classes": (lambda a: a.update(pred=a["pred"][:, :0]), ValueError, "no classes (C = 0)"),
    "negative_beta": (lambda a: a.update(beta=-0.5), ValueError, "beta must be a finite number >= 0"),
    "nan_beta": (lambda a: a.update(beta=float("nan")), ValueError, "beta must be a finite number >= 0"),
    "inf_beta": (lambda a: a.update(beta=float("inf")), ValueError, "beta must be a finite number >= 0"),
    "string_beta": (lambda a: a.update(beta="2"), ValueError, "beta must be a finite number >= 0"),
    "invalid_reduction": (
        lambda a: a.update(reduction="avg"),
        ValueError,
        "reduction must be one of ('none', 'mean', 'sum')",
    ),
    "sum_with_avg_factor": (
        lambda a: a.update(reduction="sum", avg_factor=2.0),
        ValueError,
        'avg_factor can not be used with reduction="sum"',
    ),
    "sum_with_tensor_avg_factor": (
        lambda a: a.update(reduction="sum", avg_factor=torch.tensor(2.0)),
        ValueError,
        "avg_factor can not be used",
    ),
    "unknown_backend": (
        lambda a: a.update(backend="cuda"),
        ValueError,
        "backend must be 'auto' or one of ('native', 'triton', 'reference')",
    ),
}


@pytest.mark.parametrize("name", sorted(QFL_BAD))
def test_quality_focal_loss_bad_input(name):
    modify, exception, fragment = QFL_BAD[name]
    pred, label, score = _qfl_args()
    args = dict(pred=pred, label=label, score=score)
    modify(args)
    with pytest.raises(exception) as info:
        gfl_ops.quality_focal_loss(args.pop("pred"), args.pop("label"), args.pop("score"), **args)
    assert fragment in str(info.value)


DENSE_BAD = {
    "target_shape": (
        lambda a: a.update(target=a["target"][:, :-1]),
        ValueError,
        "target must have pred's shape (6, 4)",
    ),
    "target_integer": (
        lambda a: a.update(target=a["target"].long()),
        TypeError,
        "target must be a floating-point tensor",
    ),
    "target_on_meta": (
        lambda a: a.update(target=a["target"].to(META)),
        ValueError,
        "target is on meta but pred is on cpu",
    ),
    "target_not_tensor": (lambda a: a.update(target=0.5), TypeError, "target must be a torch.Tensor"),
    "integer_pred": (lambda a: a.update(pred=a["pred"].int(), target=a["target"]), TypeError, "pred must be float16"),
    "no_classes": (
        lambda a: a.update(pred=a["pred"][:, :0], target=a["target"][:, :0]),
        ValueError,
        "no classes (C = 0)",
    ),
    "weight_shape": (lambda a: a.update(weight=torch.ones(6, 4)), ValueError, "weight must have the loss's shape (6,)"),
    "negative_beta": (lambda a: a.update(beta=-1.0), ValueError, "beta must be a finite number >= 0"),
    "nan_beta": (lambda a: a.update(beta=float("nan")), ValueError, "beta must be a finite number >= 0"),
    "invalid_reduction": (lambda a: a.update(reduction="max"), ValueError, "reduction must be one of"),
    "sum_with_avg_factor": (
        lambda a: a.update(reduction="sum", avg_factor=1.0),
        ValueError,
        "avg_factor can not be used",
    ),
    "unknown_backend": (lambda a: a.update(backend="fast"), ValueError, "backend must be 'auto' or one of"),
}


@pytest.mark.parametrize("name", sorted(DENSE_BAD))
def test_quality_focal_loss_dense_bad_input(name):
    modify, exception, fragment = DENSE_BAD[name]
    pred, _, _ = _qfl_args()
    args = dict(pred=pred, target=torch.rand(pred.shape))
    modify(args)
    with pytest.raises(exception) as info:
        gfl_ops.quality_focal_loss_dense(args.pop("pred"), args.pop("target"), **args)
    assert fragment in str(info.value)


DFL_BAD = {
    "pred_1d": (lambda a: a.update(pred=a["pred"][0]), ValueError, "pred must be (..., n + 1) logits over bins 0..n"),
    "pred_3d_target_2d_mismatch": (
        lambda a: a.update(pred=a["pred"][None]),
        ValueError,
        "target must have shape (1, 5) (pred's without its bins)",
    ),
    "one_bin": (lambda a: a.update(pred=a["pred"][:, :1]), ValueError, "pred needs at least 2 bins"),
    "integer_pred": (lambda a: a.update(pred=a["pred"].long()), TypeError, "pred must be float16"),
    "target_shape": (lambda a: a.update(target=a["target"][:-1]), ValueError, "target must have shape (5,)"),
    "target_2d": (lambda a: a.update(target=a["target"][:, None]), ValueError, "target must have shape (5,)"),
    "target_integer": (
        lambda a: a.update(target=a["target"].long()),
        TypeError,
        "target must be a floating-point tensor",
    ),
    "target_on_meta": (
        lambda a: a.update(target=a["target"].to(META)),
        ValueError,
        "target is on meta but pred is on cpu",
    ),
    "weight_shape": (
        lambda a: a.update(weight=torch.ones(4)),
        ValueError,
        "weight must have the loss's shape (5,) or broadcast to it",
    ),
    "weight_on_meta": (lambda a: a.update(weight=torch.ones(5, device=META)), ValueError, "weight is on meta"),
    "invalid_reduction": (lambda a: a.update(reduction="batchmean"), ValueError, "reduction must be one of"),
    "sum_with_avg_factor": (
        lambda a: a.update(reduction="sum", avg_factor=4.0),
        ValueError,
        "avg_factor can not be used",
    ),
    "unknown_backend": (lambda a: a.update(backend="Native"), ValueError, "backend must be 'auto' or one of"),
}


@pytest.mark.parametrize("name", sorted(DFL_BAD))
def test_distribution_focal_loss_bad_input(name):
    modify, exception, fragment = DFL_BAD[name]
    pred, target = _dfl_args()
    args = dict(pred=pred, target=target)
    modify(args)
    with pytest.raises(exception) as info:
        gfl_ops.distribution_focal_loss(args.pop("pred"), args.pop("target"), **args)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "bad_value", [-0.5, -1e-6, 16.0001, 17.0, 1e30, float("nan"), float("inf"), float("-inf")], ids=str
)
def test_distribution_focal_loss_target_out_of_range_names_the_range(bad_value):
    pred, target = _dfl_args()
    target[2] = bad_value
    with pytest.raises(ValueError) as info:
        gfl_ops.distribution_focal_loss(pred, target)
    message = str(info.value)
    assert "target must lie in [0, 16]" in message
    assert "1 value(s) outside" in message
    assert "validate=False" in message


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_distribution_focal_loss_validate_false_clamps(dtype, backend):
    """validate=False: no error; the result equals the loss of the target clamped to [0, n]
    (NaN -> 0), computed here with the explicit formula in float64."""
    pred, target = _dfl_args(m=8, bins=9, dtype=dtype)
    target[:] = torch.tensor([-3.0, 8.5, float("nan"), float("inf"), float("-inf"), 1e30, 2.5, 8.0]).to(target.dtype)
    clamped = torch.tensor([0.0, 8.0, 0.0, 8.0, 0.0, 8.0, 2.5, 8.0], dtype=torch.float64)
    leaf = pred.detach().requires_grad_()
    loss = gfl_ops.distribution_focal_loss(leaf, target, reduction="none", validate=False, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    z = pred.double()
    i = clamped.floor().clamp(max=7).long()
    w_l = (i + 1).double() - clamped
    logp = z.log_softmax(1)
    expected = -(w_l * logp.gather(1, i[:, None])[:, 0] + (1 - w_l) * logp.gather(1, i[:, None] + 1)[:, 0])
    onehot = (
        torch.zeros_like(z).scatter_(1, i[:, None], w_l[:, None]).scatter_add_(1, i[:, None] + 1, (1 - w_l)[:, None])
    )
    expected_grad = z.softmax(1) - onehot
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol)


def test_distribution_focal_loss_target_equal_to_n_is_valid():
    pred, target = _dfl_args(m=3, bins=17, dtype=torch.float64)
    target[:] = 16.0
    loss = gfl_ops.distribution_focal_loss(pred, target, reduction="none", backend="native")
    torch.testing.assert_close(loss, -pred.log_softmax(1)[:, 16], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "pred,exception,fragment",
    [
        (torch.randn(3, 5).long(), TypeError, "pred must be float16"),
        (torch.randn(3, 1), ValueError, "at least 2 bins"),
        (torch.tensor(1.0), ValueError, "at least 2 bins"),
    ],
    ids=["integer", "one_bin", "scalar"],
)
def test_distribution_integral_bad_input(pred, exception, fragment):
    with pytest.raises(exception) as info:
        gfl_ops.distribution_integral(pred)
    assert fragment in str(info.value)


def test_explicit_triton_backend_on_cpu_is_not_available():
    if gfl_ops.triton.INTERPRETER:
        pytest.skip("TRITON_INTERPRET=1: the Triton backend runs on CPU in this process")
    pred, label, score = _qfl_args()
    with pytest.raises(ValueError) as info:
        gfl_ops.quality_focal_loss(pred, label, score, backend="triton")
    assert "backend 'triton' is not available for quality_focal_loss on device type 'cpu'" in str(info.value)
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        gfl_ops.distribution_focal_loss(*_dfl_args(), backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        gfl_ops.distribution_integral(torch.randn(2, 5), backend="triton")


# --------------------------------------------------------------------------------------
# Empty inputs
# --------------------------------------------------------------------------------------


def _empty_cases(dtype):
    return {
        "qfl": (
            torch.zeros(0, 5, dtype=dtype),
            lambda p, **kw: gfl_ops.quality_focal_loss(p, torch.zeros(0, dtype=torch.long), torch.zeros(0), **kw),
        ),
        "qfl_4d": (
            torch.zeros(2, 5, 0, 3, dtype=dtype),
            lambda p, **kw: gfl_ops.quality_focal_loss(
                p, torch.zeros(2, 0, 3, dtype=torch.long), torch.zeros(2, 0, 3), **kw
            ),
        ),
        "qfl_dense": (
            torch.zeros(0, 5, dtype=dtype),
            lambda p, **kw: gfl_ops.quality_focal_loss_dense(p, torch.zeros(0, 5, dtype=dtype), **kw),
        ),
        "dfl": (
            torch.zeros(0, 17, dtype=dtype),
            lambda p, **kw: gfl_ops.distribution_focal_loss(p, torch.zeros(0), **kw),
        ),
    }


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["qfl", "qfl_4d", "qfl_dense", "dfl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_empty_input_gives_zero_loss_and_empty_gradient(case, reduction, backend, dtype):
    pred, call = _empty_cases(dtype)[case]
    pred.requires_grad_()
    loss = call(pred, reduction=reduction, backend=backend)
    if reduction == "none":
        assert loss.numel() == 0
        assert loss.shape == ((pred.shape[0],) + tuple(pred.shape[2:]) if case != "dfl" else (0,))
    else:
        assert loss.shape == () and loss.item() == 0.0
    loss.sum().backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape and pred.grad.dtype == dtype


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_empty_input_mean_with_avg_factor_and_integral(backend):
    pred = torch.zeros(0, 3, requires_grad=True)
    loss = gfl_ops.quality_focal_loss(
        pred, torch.zeros(0, dtype=torch.long), torch.zeros(0), avg_factor=torch.tensor(1.0), backend=backend
    )
    assert loss.item() == 0.0
    bins = torch.zeros(0, 8, requires_grad=True)
    value = gfl_ops.distribution_integral(bins, backend=backend)
    assert value.shape == (0,)
    value.sum().backward()
    assert bins.grad.shape == (0, 8)


# --------------------------------------------------------------------------------------
# NaN / inf logits, out-of-range labels
# --------------------------------------------------------------------------------------


def _special_logits(dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    specials = [float("nan"), float("inf"), float("-inf")]
    for row in range(8):
        for col in range(6):
            if (row * 6 + col) % 4 == 0:
                x[row, col] = specials[(row + col) % 3]
    return x.to(dtype)


def _check_masks_and_values(actual, expected, rtol):
    actual, expected = actual.double(), expected.double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    assert torch.equal(torch.isposinf(actual), torch.isposinf(expected)), (actual, expected)
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_nan_inf_logits_beta_zero_equal_bce_with_logits(dtype):
    """beta = 0: per anchor, QFL = sum over classes of F.binary_cross_entropy_with_logits,
    including where that is NaN or inf (per element and per row)."""
    x = _special_logits(dtype)
    label = torch.tensor([0, 6, 2, -1, 5, 3, 1, 4])
    score = torch.tensor([0.0, 0.3, 1.0, 0.5, 0.7, 0.25, 1.0, 0.9], dtype=dtype)
    target = torch.zeros_like(x)
    positive = (label >= 0) & (label < 6)
    target[positive.nonzero().squeeze(1), label[positive]] = score[positive]
    expected_elements = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    assert torch.isnan(expected_elements).any() and torch.isinf(expected_elements).any()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    # Per element: C = 1 anchors.
    per_element = gfl_ops.quality_focal_loss_dense(
        x.reshape(-1, 1), target.reshape(-1, 1), beta=0.0, reduction="none", backend="native"
    )
    _check_masks_and_values(per_element, expected_elements.reshape(-1), rtol)
    # Per row, both target forms.
    expected_rows = expected_elements.sum(1)
    _check_masks_and_values(
        gfl_ops.quality_focal_loss(x, label, score, beta=0.0, reduction="none", backend="native"), expected_rows, rtol
    )
    _check_masks_and_values(
        gfl_ops.quality_focal_loss_dense(x, target, beta=0.0, reduction="none", backend="native"), expected_rows, rtol
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_nan_logits_propagate_to_the_row_for_any_beta(dtype):
    x = _special_logits(dtype)
    label = torch.tensor([0, 6, 2, -1, 5, 3, 1, 4])
    score = torch.full((8,), 0.5, dtype=dtype)
    loss = gfl_ops.quality_focal_loss(x, label, score, beta=2.0, reduction="none", backend="native")
    has_nan = torch.isnan(x).any(1)
    assert torch.isnan(loss[has_nan]).all()
    bins = torch.randn(4, 5, dtype=dtype)
    bins[1, 2] = float("nan")
    dfl = gfl_ops.distribution_focal_loss(bins, torch.full((4,), 1.5, dtype=dtype), reduction="none", backend="native")
    value = gfl_ops.distribution_integral(bins, backend="native")
    assert torch.isnan(dfl).tolist() == [False, True, False, False]
    assert torch.isnan(value).tolist() == [False, True, False, False]


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_out_of_range_labels_are_background(label_dtype):
    """Huge, negative and just-out-of-range labels never crash and match no class."""
    info = torch.iinfo(label_dtype)
    c = 5
    values = [info.max, info.min, -1, c, c + 1, 2**31 - 1 if info.bits == 64 else info.max, 0, 4]
    label = torch.tensor(values, dtype=torch.int64).clamp(info.min, info.max).to(label_dtype)
    gen = torch.Generator().manual_seed(9)
    pred = torch.randn(len(values), c, generator=gen, dtype=torch.float64, requires_grad=True)
    score = torch.rand(len(values), generator=gen, dtype=torch.float64)
    loss = gfl_ops.quality_focal_loss(pred, label, score, reduction="none", backend="native")
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    # Explicit dense target: only labels in [0, C) are positives.
    label64 = label.to(torch.int64)
    target = torch.zeros(len(values), c, dtype=torch.float64)
    for row, lab in enumerate(label64.tolist()):
        if 0 <= lab < c:
            target[row, lab] = score[row]
    expected = gfl_ops.quality_focal_loss_dense(
        pred.detach().requires_grad_(), target, reduction="none", backend="reference"
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    sigma = torch.sigmoid(pred.detach())
    bce = F.binary_cross_entropy_with_logits(pred.detach(), target, reduction="none")
    expected_grad = (sigma - target) ** 3 + 2 * bce * (sigma - target) * sigma * (1 - sigma)  # docs/MATH.md, beta = 2
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_huge_labels_on_the_direct_operator():
    pred = torch.randn(4, 3)
    label = torch.tensor([2**62, -(2**62), 3, -1])
    loss, grad = OPS._quality_focal_loss_native(pred, label, torch.rand(4), None, None, 2.0, False, "none", True)
    expected = gfl_ops.reference.quality_focal_loss_dense_per_anchor(
        pred.double(), torch.zeros(4, 3, dtype=torch.float64)
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------
# Registered operators called directly: the native kernels' own checks keep them in bounds
# --------------------------------------------------------------------------------------

P = torch.randn(4, 3)
L = torch.zeros(4, dtype=torch.long)
S = torch.rand(4)
DIRECT_BAD = {
    "qfl_label_int32": lambda: OPS._quality_focal_loss_native(P, L.int(), S, None, None, 2.0, False, "none", False),
    "qfl_label_float": lambda: OPS._quality_focal_loss_native(P, L.float(), S, None, None, 2.0, False, "none", True),
    "qfl_label_shape": lambda: OPS._quality_focal_loss_native(P, L[:3], S, None, None, 2.0, False, "none", False),
    "qfl_label_2d": lambda: OPS._quality_focal_loss_native(P, L[:, None], S, None, None, 2.0, False, "none", False),
    "qfl_score_shape": lambda: OPS._quality_focal_loss_native(P, L, S[:2], None, None, 2.0, False, "none", False),
    "qfl_score_float64_for_float32_pred": lambda: OPS._quality_focal_loss_native(
        P, L, S.double(), None, None, 2.0, False, "none", False
    ),
    "qfl_score_half_for_half_pred": lambda: OPS._quality_focal_loss_native(
        P.half(), L, S.half(), None, None, 2.0, False, "none", False
    ),
    "qfl_integer_pred": lambda: OPS._quality_focal_loss_native(P.long(), L, S, None, None, 2.0, False, "none", False),
    "qfl_pred_1d": lambda: OPS._quality_focal_loss_native(P[:, 0], L, S, None, None, 2.0, False, "none", False),
    "qfl_no_classes": lambda: OPS._quality_focal_loss_native(P[:, :0], L, S, None, None, 2.0, False, "none", False),
    "qfl_negative_beta": lambda: OPS._quality_focal_loss_native(P, L, S, None, None, -1.0, False, "none", False),
    "qfl_nan_beta": lambda: OPS._quality_focal_loss_native(P, L, S, None, None, float("nan"), False, "none", False),
    "dense_target_shape": lambda: OPS._quality_focal_loss_dense_native(
        P, P[:, :2], None, None, 2.0, False, "none", False
    ),
    "dense_target_dtype": lambda: OPS._quality_focal_loss_dense_native(
        P, P.double(), None, None, 2.0, False, "none", False
    ),
    "dense_integer_pred": lambda: OPS._quality_focal_loss_dense_native(
        P.int(), P.int(), None, None, 2.0, False, "none", False
    ),
    "dense_negative_beta": lambda: OPS._quality_focal_loss_dense_native(P, P, None, None, -2.0, False, "none", True),
    "dfl_target_dtype": lambda: OPS._distribution_focal_loss_native(P, S.double(), None, "none", False),
    "dfl_target_shape": lambda: OPS._distribution_focal_loss_native(P, S[:3], None, "none", True),
    "dfl_target_2d": lambda: OPS._distribution_focal_loss_native(P, S[:, None], None, "none", False),
    "dfl_pred_3d": lambda: OPS._distribution_focal_loss_native(P[None], S, None, "none", False),
    "dfl_one_bin": lambda: OPS._distribution_focal_loss_native(P[:, :1], S, None, "none", False),
    "dfl_integer_pred": lambda: OPS._distribution_focal_loss_native(P.long(), S, None, "none", False),
    "integral_one_bin": lambda: OPS._distribution_integral_native(P[:, :1], None, True),
    "integral_1d": lambda: OPS._distribution_integral_native(P[0], None, False),
    "integral_integer_pred": lambda: OPS._distribution_integral_native(P.short(), None, False),
}


@pytest.mark.parametrize("name", sorted(DIRECT_BAD))
def test_direct_operator_bad_input_raises_runtime_error(name):
    with pytest.raises(RuntimeError):
        DIRECT_BAD[name]()


BAD_KERNEL_REDUCTION = {
    "qfl_mean": lambda: OPS._quality_focal_loss_native(P, L, S, None, None, 2.0, False, "mean", False),
    "dense_typo": lambda: OPS._quality_focal_loss_dense_native(P, P, None, None, 2.0, False, "sums", False),
    "dfl_empty": lambda: OPS._distribution_focal_loss_native(P, S, None, "", True),
}


@pytest.mark.parametrize("name", sorted(BAD_KERNEL_REDUCTION))
def test_direct_operator_reduction_is_none_or_sum(name):
    """The operators sum; the mean (over anchors or avg_factor) is taken outside them."""
    with pytest.raises(ValueError, match='reduction must be "none" or "sum"'):
        BAD_KERNEL_REDUCTION[name]()


DEVICE_MIX = {
    "qfl_label_on_meta": lambda: OPS._quality_focal_loss_native(
        P, L.to(META), S, None, None, 2.0, False, "none", False
    ),
    "qfl_score_on_meta": lambda: OPS._quality_focal_loss_native(
        P, L, S.to(META), None, None, 2.0, False, "none", False
    ),
    "dense_target_on_meta": lambda: OPS._quality_focal_loss_dense_native(
        P, P.to(META), None, None, 2.0, False, "none", False
    ),
    "dfl_target_on_meta": lambda: OPS._distribution_focal_loss_native(P, S.to(META), None, "none", False),
}


@pytest.mark.parametrize("name", sorted(DEVICE_MIX))
def test_direct_operator_mixed_devices_raise(name):
    """A CPU pred with a 'meta' label/score/target dispatches to the fake kernel, which must
    check devices as the kernels do rather than return uninitialised tensors."""
    try:
        loss, _ = DEVICE_MIX[name]()
    except RuntimeError:
        return
    raise AssertionError(f"no error: returned a loss on {loss.device}")


def test_functional_under_no_grad_computes_no_gradient():
    pred = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        loss = gfl_ops.quality_focal_loss(pred, L, S, backend="native")
    assert loss.grad_fn is None and not loss.requires_grad
    with_grad = gfl_ops.quality_focal_loss(pred, L, S, backend="native")
    assert with_grad.requires_grad
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["qfl", "dfl", "integral"])
def test_double_backward_raises_a_clear_error(op):
    """The fused backward is not differentiable: create_graph=True must say so, not return a
    gradient that silently lacks its second-order terms."""
    pred = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    if op == "qfl":
        loss = gfl_ops.quality_focal_loss(
            pred, torch.randint(0, 6, (6,)), torch.rand(6, dtype=torch.float64), backend="native"
        )
    elif op == "dfl":
        loss = gfl_ops.distribution_focal_loss(pred, torch.rand(6, dtype=torch.float64) * 4, backend="native")
    else:
        loss = gfl_ops.distribution_integral(pred, backend="native").sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, pred, create_graph=True)


def test_public_operator_names_a_bad_backend():
    """The public operators take "native" or "triton" only, and say so."""
    with pytest.raises(ValueError, match='quality_focal_loss: backend must be "native" or "triton", got "cuda"'):
        OPS.quality_focal_loss(P, L, S, None, None, 2.0, False, "none", "cuda")
    with pytest.raises(ValueError, match='distribution_integral: backend must be "native" or "triton"'):
        OPS.distribution_integral(P, "auto")


SPARSE_CALLS = {
    "pred": lambda p, labels, s, w: gfl_ops.quality_focal_loss(p.to_sparse(), labels, s),
    "label": lambda p, labels, s, w: gfl_ops.quality_focal_loss(p, labels.to_sparse(), s),
    "score": lambda p, labels, s, w: gfl_ops.quality_focal_loss(p, labels, s.to_sparse()),
    "weight": lambda p, labels, s, w: gfl_ops.sigmoid_focal_loss(p, labels, weight=w.to_sparse()),
    "target": lambda p, labels, s, w: gfl_ops.sigmoid_focal_loss(p, torch.rand(p.shape).to_sparse()),
    "avg_factor": lambda p, labels, s, w: gfl_ops.sigmoid_focal_loss(p, labels, avg_factor=torch.ones(1).to_sparse()),
}


@pytest.mark.parametrize("argument", sorted(SPARSE_CALLS))
def test_sparse_tensors_are_refused_naming_the_argument(argument):
    """A sparse tensor reached the dispatcher (NotImplementedError ... SparseCPU); it is
    refused before any kernel, naming the argument."""
    pred, label, score = _qfl_args()
    with pytest.raises(
        TypeError, match=f": {argument} must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"
    ):
        SPARSE_CALLS[argument](pred, label.clamp(0, 3), score, torch.rand(6))


@pytest.mark.parametrize("exponent", ["gamma", "alpha"])
def test_numpy_half_arguments_raise_no_warning(exponent, recwarn):
    """Comparing numpy.float16(2) with float32's max cast that max to float16 (overflow)."""
    import numpy as np

    pred, label, _ = _qfl_args()
    value = np.float16(2.0 if exponent == "gamma" else 0.25)
    loss = gfl_ops.sigmoid_focal_loss(pred, label.clamp(0, 3), **{exponent: value}, backend="reference")
    expected = gfl_ops.sigmoid_focal_loss(pred, label.clamp(0, 3), **{exponent: float(value)}, backend="reference")
    assert [str(w.message) for w in recwarn] == []
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["constant_weight", "weight_requires_grad"])
def test_float64_weight_and_avg_factor_do_not_promote_a_float32_loss(backend, weight_requires_grad):
    """One rule for every backend: the loss has pred's computation dtype (float32 here); the
    weight's gradient comes back in the weight's dtype."""
    pred, label, score = _qfl_args()
    weight = torch.rand(6, dtype=torch.float64, requires_grad=weight_requires_grad)
    avg_factor = torch.tensor(3.0, dtype=torch.float64)
    losses = [
        gfl_ops.quality_focal_loss(pred, label, score, weight=weight, avg_factor=avg_factor, backend=backend),
        gfl_ops.sigmoid_focal_loss(pred, label, weight=weight, avg_factor=avg_factor, backend=backend),
        gfl_ops.varifocal_loss(pred, (label, score), weight=weight, reduction="none", backend=backend),
        gfl_ops.distribution_focal_loss(*_dfl_args(m=6), weight=weight, backend=backend),
    ]
    assert [loss.dtype for loss in losses] == [torch.float32] * len(losses)
    if weight_requires_grad:
        sum(loss.sum() for loss in losses).backward()
        assert weight.grad.dtype == torch.float64
