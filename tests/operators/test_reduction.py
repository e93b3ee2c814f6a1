"""gfl_ops.weight_reduce_loss against explicit formulas (mmdetection 3.x's reductions), and the
reductions as every public function applies them."""

import math

import pytest
import torch

import gfl_ops
from gfl_ops import weight_reduce_loss

EPS32 = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, written out


def _loss_and_weight(n=9):
    gen = torch.Generator().manual_seed(3)
    return torch.rand(n, generator=gen, dtype=torch.float64) * 4, torch.rand(n, generator=gen, dtype=torch.float64)


def test_none_returns_the_weighted_loss():
    loss, weight = _loss_and_weight()
    assert torch.equal(weight_reduce_loss(loss, None, "none"), loss)
    torch.testing.assert_close(
        weight_reduce_loss(loss, weight, "none"),
        torch.tensor([a * b for a, b in zip(loss.tolist(), weight.tolist())], dtype=torch.float64),
    )


def test_sum():
    loss, weight = _loss_and_weight()
    torch.testing.assert_close(
        weight_reduce_loss(loss, None, "sum"), torch.tensor(sum(loss.tolist()), dtype=torch.float64)
    )
    expected = sum(a * b for a, b in zip(loss.tolist(), weight.tolist()))
    torch.testing.assert_close(weight_reduce_loss(loss, weight, "sum"), torch.tensor(expected, dtype=torch.float64))


def test_mean_without_avg_factor():
    loss, weight = _loss_and_weight()
    torch.testing.assert_close(
        weight_reduce_loss(loss, None, "mean"), torch.tensor(sum(loss.tolist()) / 9, dtype=torch.float64)
    )
    expected = sum(a * b for a, b in zip(loss.tolist(), weight.tolist())) / 9
    torch.testing.assert_close(weight_reduce_loss(loss, weight, "mean"), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    "avg_factor",
    [2.5, torch.tensor(2.5, dtype=torch.float64), torch.tensor(2.5)],
    ids=["float", "tensor64", "tensor32"],
)
def test_mean_with_avg_factor_adds_float32_eps(avg_factor):
    loss, weight = _loss_and_weight()
    if isinstance(avg_factor, torch.Tensor) and avg_factor.dtype == torch.float32:
        divisor = (torch.tensor(2.5) + EPS32).item()  # added in float32, as mmdetection does
    else:
        divisor = 2.5 + EPS32
    expected = sum(a * b for a, b in zip(loss.tolist(), weight.tolist())) / divisor
    out = weight_reduce_loss(loss, weight, "mean", avg_factor)
    assert out.dim() == 0
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    if divisor != 2.5:  # the eps is there: dividing by 2.5 alone differs
        assert abs(out.item() - expected * divisor / 2.5) > 1e-12 * abs(expected)


def test_avg_factor_zero_does_not_divide_by_zero():
    loss, _ = _loss_and_weight()
    out = weight_reduce_loss(loss, None, "mean", 0.0)
    torch.testing.assert_close(out, torch.tensor(sum(loss.tolist()) / EPS32, dtype=torch.float64))


def test_none_with_avg_factor_is_unchanged():
    """mmdetection returns the weighted loss unreduced when reduction='none' has an avg_factor."""
    loss, weight = _loss_and_weight()
    torch.testing.assert_close(weight_reduce_loss(loss, weight, "none", 3.0), loss * weight)


def test_sum_with_avg_factor_raises():
    loss, _ = _loss_and_weight()
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        weight_reduce_loss(loss, None, "sum", 2.0)


@pytest.mark.parametrize("reduction", ["avg", "Mean", None, ""])
def test_invalid_reduction_raises(reduction):
    loss, _ = _loss_and_weight()
    with pytest.raises(ValueError, match="reduction must be one of"):
        weight_reduce_loss(loss, None, reduction)


def test_empty_loss():
    empty = torch.zeros(0, dtype=torch.float32)
    mean = weight_reduce_loss(empty, None, "mean")
    assert mean.shape == () and mean.item() == 0.0  # not NaN, unlike torch.mean of nothing
    assert weight_reduce_loss(empty, None, "sum").item() == 0.0
    assert weight_reduce_loss(empty, torch.zeros(0), "mean", avg_factor=2.0).item() == 0.0
    none = weight_reduce_loss(empty, torch.zeros(0), "none")
    assert none.shape == (0,)


def test_avg_factor_tensor_keeps_the_graph_and_is_not_synced():
    """A tensor avg_factor (all-reduced count) is used as a tensor: gradients flow into loss only."""
    loss = torch.rand(5, dtype=torch.float64, requires_grad=True)
    avg = torch.tensor(4.0, dtype=torch.float64)
    out = weight_reduce_loss(loss, None, "mean", avg)
    (grad,) = torch.autograd.grad(out, loss)
    torch.testing.assert_close(grad, torch.full((5,), 1 / (4.0 + EPS32), dtype=torch.float64))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_public_functions_apply_the_reduction_to_the_unreduced_loss(backend, reduction):
    """Each public function = weight_reduce_loss of its own reduction='none' output."""
    gen = torch.Generator().manual_seed(11)
    pred = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    label = torch.tensor([0, 4, 1, -1, 3, 2])
    score = torch.rand(6, generator=gen, dtype=torch.float64)
    bins = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    target = torch.rand(6, generator=gen, dtype=torch.float64) * 4
    weight = torch.rand(6, generator=gen, dtype=torch.float64)
    avg = None if reduction == "sum" else 2.0
    calls = [
        lambda **kw: gfl_ops.quality_focal_loss(pred, label, score, backend=backend, **kw),
        lambda **kw: gfl_ops.quality_focal_loss_dense(pred, torch.sigmoid(pred) * 0.5, backend=backend, **kw),
        lambda **kw: gfl_ops.distribution_focal_loss(bins, target, backend=backend, **kw),
    ]
    for call in calls:
        unreduced = call(reduction="none")
        assert unreduced.shape == (6,)
        manual = unreduced * weight
        if reduction == "sum":
            manual = manual.sum()
        elif reduction == "mean":
            manual = manual.sum() / (2.0 + EPS32)
        out = call(reduction=reduction, weight=weight, avg_factor=avg)
        torch.testing.assert_close(out, manual, rtol=1e-12, atol=1e-12)


def _summed_by_operator(name, threads):
    """The loss summed inside the native kernel (reduction "sum"), with `threads` threads."""
    gen = torch.Generator().manual_seed(23)
    ops = torch.ops.gfl_ops
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if name == "qfl":
            pred = torch.randn(3000, 80, generator=gen)
            label = torch.randint(0, 90, (3000,), generator=gen)
            args = (pred, label, torch.rand(3000, generator=gen), torch.rand(3000, generator=gen), None, 2.0, False)
        elif name == "qfl_nchw":
            pred = torch.randn(2, 20, 37, 41, generator=gen)
            target = torch.rand(pred.shape, generator=gen) * (torch.rand(pred.shape, generator=gen) < 0.01)
            args = (pred, target, None, None, 1.5, False)
        elif name == "focal_nchw":
            pred = torch.randn(2, 20, 37, 41, generator=gen)
            label = torch.randint(0, 30, (2, 37, 41), generator=gen)
            args = (
                pred,
                label,
                torch.rand(label.shape, generator=gen),
                torch.rand(20, generator=gen),
                0.25,
                2.0,
                False,
            )
        else:
            pred = torch.randn(20000, 17, generator=gen)
            args = (pred, torch.rand(20000, generator=gen) * 16, torch.rand(20000, generator=gen))
        op = {
            "qfl": ops._quality_focal_loss_native,
            "qfl_nchw": ops._quality_focal_loss_dense_native,
            "focal_nchw": ops._sigmoid_focal_loss_native,
            "dfl": ops._distribution_focal_loss_native,
        }[name]
        total, _ = op(*args, "sum", False)
        per_anchor, _ = op(*args, "none", False)
    finally:
        torch.set_num_threads(previous)
    return total, per_anchor


@pytest.mark.parametrize("name", ["qfl", "qfl_nchw", "focal_nchw", "dfl"])
def test_native_sum_is_deterministic_whatever_the_thread_count(name):
    """The operators add up their losses in fixed chunks and a fixed order: the same bits
    with one thread or two, run after run; and as accurate as a float64 sum rounded once."""
    if not torch.ops.gfl_ops._distribution_focal_loss_native.default.has_kernel_for_dispatch_key("CPU"):
        pytest.skip("the native CPU kernels are not built")
    one_thread, per_anchor = _summed_by_operator(name, 1)
    two_threads, _ = _summed_by_operator(name, 2)
    again, _ = _summed_by_operator(name, 2)
    assert one_thread.shape == () and one_thread.dtype == torch.float32
    assert torch.equal(one_thread, two_threads) and torch.equal(two_threads, again)
    exact = math.fsum(per_anchor.double().flatten().tolist())
    assert abs(one_thread.item() - exact) <= abs(exact) * torch.finfo(torch.float32).eps


def test_native_sum_of_no_anchors_is_zero():
    ops = torch.ops.gfl_ops
    total, grad = ops._distribution_focal_loss_native(torch.empty(0, 17), torch.empty(0), None, "sum", True)
    assert total.shape == () and total.item() == 0.0 and grad.shape == (0, 17)
    total, _ = ops._quality_focal_loss_native(
        torch.empty(0, 80), torch.empty(0, dtype=torch.long), torch.empty(0), None, None, 2.0, False, "sum", False
    )
    assert total.shape == () and total.item() == 0.0
