"""Distribution Focal Loss and the distribution integral, backend="native" against the float64
reference: values and gradients, over dtype x layout x odd sizes x reduction x weighting.
"""

import pytest
import torch

import gfl_ops
from _helpers import (
    BIN_CASES,
    DEVICES,
    FLOAT_DTYPES,
    WEIGHTINGS,
    accumulate_dtype,
    bin_case_id,
    check_parity,
    dtype_id,
    make_bin_pred,
    make_dfl_target,
    make_generator,
    reduction_params,
    weighting_kwargs,
)

REDUCTIONS = ("none", "mean", "sum")


def dfl_call(pred, *, backend, target, **kwargs):
    return gfl_ops.distribution_focal_loss(pred, target, backend=backend, **kwargs)


def integral_call(pred, *, backend):
    return gfl_ops.distribution_integral(pred, backend=backend)


def bin_params():
    return [
        pytest.param(dtype, case, id=f"{dtype_id(dtype)}-{bin_case_id(case)}")
        for dtype in FLOAT_DTYPES
        for case in BIN_CASES
    ]


# --------------------------------------------------------------------------------------
# DFL
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,case", bin_params())
def test_dfl_layouts_and_sizes(device, dtype, case):
    layout, rows, bins = case
    gen = make_generator("dfl-layout", dtype, case)
    pred = make_bin_pred(layout, rows, bins, dtype, device, gen)
    target = make_dfl_target(rows, bins, accumulate_dtype(dtype), gen, device)
    check_parity(dfl_call, pred, dict(target=target, reduction="none"), out_dtype=accumulate_dtype(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,reduction,weighting", reduction_params(WEIGHTINGS, REDUCTIONS))
def test_dfl_reductions_weights_avg_factor(device, dtype, reduction, weighting):
    gen = make_generator("dfl-reduction", dtype, reduction, weighting)
    rows, bins = 28, 17  # 7 anchors x 4 sides, GFL's reg_max = 16
    pred = make_bin_pred("contiguous", rows, bins, dtype, device, gen)
    target = make_dfl_target(rows, bins, accumulate_dtype(dtype), gen, device)
    kwargs = weighting_kwargs(weighting, reduction, (rows,), accumulate_dtype(dtype), gen, device)
    out, _ = check_parity(dfl_call, pred, dict(target=target, **kwargs), out_dtype=accumulate_dtype(dtype))
    assert out.shape == ((rows,) if reduction == "none" else ())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "bins_strided"])
@pytest.mark.parametrize("dtype,reduction,weighting", reduction_params(["none", "broadcast"], REDUCTIONS))
def test_dfl_sides_of_boxes_with_a_weight_per_box(device, layout, dtype, reduction, weighting):
    """ultralytics' shapes: pred (M, 4, n + 1) (its gathered foreground: contiguous; or a
    view whose leading dimensions do not merge, read through a copy), target (M, 4), a
    weight (M, 1) broadcast over the 4 sides."""
    gen = make_generator("dfl-sides", dtype, reduction, weighting, layout)
    boxes, bins = 9, 16
    head = torch.randn(boxes, bins, 4, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    pred = head.transpose(1, 2) if layout == "bins_strided" else head.transpose(1, 2).contiguous()
    target = make_dfl_target(boxes * 4, bins, accumulate_dtype(dtype), gen, device).view(boxes, 4)
    kwargs = dict(reduction=reduction)
    if weighting == "broadcast":
        kwargs["weight"] = torch.rand(boxes, 1, generator=gen, dtype=torch.float64).to(device, accumulate_dtype(dtype))
    out, _ = check_parity(
        dfl_call,
        pred,
        dict(target=target, **kwargs),
        out_dtype=accumulate_dtype(dtype),
        check_layout=layout == "contiguous",
    )
    assert out.shape == ((boxes, 4) if reduction == "none" else ())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bins", [2, 8, 17])
def test_dfl_target_edges(dtype, bins):
    """Targets at 0, at n (valid: bins n-1 and n), at every integer, and just below n."""
    n = bins - 1
    gen = make_generator("dfl-edges", dtype, bins)
    values = [0.0, float(n), n - 1e-3, 0.5, n - 0.1] + [float(k) for k in range(n + 1)]
    target = torch.tensor(values, dtype=accumulate_dtype(dtype)).clamp(0, n)
    pred = make_bin_pred("contiguous", len(values), bins, dtype, "cpu", gen)
    check_parity(dfl_call, pred, dict(target=target, reduction="none"), out_dtype=accumulate_dtype(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_dfl_formula(dtype):
    """DFL = lse(z) - w_l z_i - w_r z_{i+1} and its gradient softmax - w, from docs/MATH.md."""
    gen = make_generator("dfl-formula", dtype)
    rows, bins = 9, 8
    n = bins - 1
    z = make_bin_pred("contiguous", rows, bins, dtype, "cpu", gen).requires_grad_()
    y = torch.tensor([0.0, 0.25, 1.0, 2.5, 3.999, 5.0, 6.5, 6.9, 7.0], dtype=dtype)
    loss = gfl_ops.distribution_focal_loss(z, y, reduction="none", backend="native")
    (grad,) = torch.autograd.grad(loss.sum(), z)
    z64, y64 = z.detach().double(), y.double()
    i = y64.floor().clamp(max=n - 1).long()
    w_l = (i + 1).double() - y64
    w_r = y64 - i.double()
    lse = torch.logsumexp(z64, dim=1)
    expected = lse - w_l * z64.gather(1, i[:, None])[:, 0] - w_r * z64.gather(1, i[:, None] + 1)[:, 0]
    w = torch.zeros(rows, bins, dtype=torch.float64)
    w.scatter_(1, i[:, None], w_l[:, None])
    w.scatter_add_(1, i[:, None] + 1, w_r[:, None])
    expected_grad = torch.softmax(z64, dim=1) - w
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected, **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)


def test_dfl_gradient_vanishes_at_the_minimum():
    """softmax_i = w_l, softmax_{i+1} = w_r (the rest ~0) is the minimum: gradient ~ 0."""
    n = 7
    y = torch.tensor([2.25, 0.5, 6.75], dtype=torch.float64)
    i = y.floor().long()
    probs = torch.full((3, n + 1), 1e-30, dtype=torch.float64)
    probs[torch.arange(3), i] = (i + 1) - y
    probs[torch.arange(3), i + 1] = y - i
    z = probs.log().requires_grad_()
    loss = gfl_ops.distribution_focal_loss(z, y, reduction="sum", backend="native")
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.abs().max().item() < 1e-12
    # ... and the expectation of that distribution is the target.
    expectation = gfl_ops.distribution_integral(z.detach(), backend="native")
    torch.testing.assert_close(expectation, y, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# Integral
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,case", bin_params())
def test_integral_layouts_and_sizes(device, dtype, case):
    layout, rows, bins = case
    gen = make_generator("integral-layout", dtype, case)
    pred = make_bin_pred(layout, rows, bins, dtype, device, gen)
    check_parity(integral_call, pred, {}, out_dtype=dtype, grad_term_scale=bins - 1)


def _nd_pred(kind, dtype, gen):
    def values(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype)

    if kind == "1d":
        return values(17)
    if kind == "3d":
        return values(3, 4, 17)  # (N, 4 sides, bins)
    if kind == "3d_permuted":
        return values(4, 3, 17).transpose(0, 1)  # rows that do not merge: reshaped by copy
    if kind == "4d_bins_strided":
        return values(2, 17, 3, 4).permute(0, 2, 3, 1)  # bins not contiguous
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["1d", "3d", "3d_permuted", "4d_bins_strided"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_integral_any_leading_shape(dtype, kind):
    gen = make_generator("integral-nd", dtype, kind)
    pred = _nd_pred(kind, dtype, gen)
    out, _ = check_parity(
        integral_call, pred, {}, out_dtype=dtype, check_layout=kind in ("1d", "3d"), grad_term_scale=pred.shape[-1] - 1
    )
    assert out.shape == pred.shape[:-1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_integral_formula(dtype):
    """E = sum_k softmax_k k, dE/dz_k = softmax_k (k - E), from docs/MATH.md."""
    gen = make_generator("integral-formula", dtype)
    z = make_bin_pred("contiguous", 6, 17, dtype, "cpu", gen).requires_grad_()
    value = gfl_ops.distribution_integral(z, backend="native")
    (grad,) = torch.autograd.grad(value.sum(), z)
    p = torch.softmax(z.detach().double(), dim=1)
    k = torch.arange(17, dtype=torch.float64)
    expected = (p * k).sum(1)
    expected_grad = p * (k - expected[:, None])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.double(), expected, **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)


def test_integral_known_values():
    n = 16
    uniform = torch.zeros(2, n + 1, dtype=torch.float64)
    peaked = torch.full((n + 1,), -1000.0, dtype=torch.float64).repeat(n + 1, 1)
    peaked[torch.arange(n + 1), torch.arange(n + 1)] = 0.0
    torch.testing.assert_close(
        gfl_ops.distribution_integral(uniform, backend="native"), torch.full((2,), n / 2, dtype=torch.float64)
    )
    torch.testing.assert_close(
        gfl_ops.distribution_integral(peaked, backend="native"), torch.arange(n + 1, dtype=torch.float64)
    )
