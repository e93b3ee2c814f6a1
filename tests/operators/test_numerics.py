"""Numerics at the edges of the input range, against references computed here.

- DFL with large logits: the loss is taken relative to the row's maximum,
  log(sum_k exp(z_k - max)) - w_l (z_l - max) - w_r (z_r - max), so that logits of 1e5, 1e7
  or 1e38 lose nothing to the rounding of max + log(sum) (the float64 reference is
  torch.log_softmax on the same, rounded, logits). Native kernels, and the Triton kernels
  (under Triton's interpreter on CPU-only machines).
- QFL with beta near FLT_MAX: |d|^beta is 0 for |d| < 1 (1 at |d| = 1), never NaN, as
  torch's pow in float32.
- Infinite logits where the modulating weight is constant (focal gamma 0, QFL beta 0, a
  detached varifocal weight): the gradient of BCE with logits times the weight, not NaN.
- Huge general exponents (focal gamma 1e9 or 1e30 at x = 20 on a negative): |m|^gamma near
  |m| = 1 from 1 - |m| in log space, so that loss and gradient in float32 are the float64
  reference's (sigma(20) rounds to 1 in float32, and 1^gamma = 1 is not 0.127).
"""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops
from _helpers import (
    DEVICES,
    FLOAT_DTYPES,
    accumulate_dtype,
    dtype_id,
    make_generator,
)

NUM_BINS = 17


def _largest_logit(dtype: torch.dtype, wanted: float) -> float:
    """`wanted`, or the largest finite value of dtype below it (float16 stops at 65504)."""
    return min(wanted, torch.finfo(dtype).max)


def _dfl_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(w_l log softmax_l + w_r log softmax_r), in float64, from pred's own values."""
    log_softmax = torch.log_softmax(pred.double(), dim=1)
    y = target.double().clamp(0, pred.shape[1] - 1)
    left = y.floor().long().clamp(max=pred.shape[1] - 2)
    weight_left = (left + 1).double() - y
    rows = torch.arange(pred.shape[0])
    return -(weight_left * log_softmax[rows, left] + (1 - weight_left) * log_softmax[rows, left + 1])


def _large_logit_rows(dtype: torch.dtype, scale: float, gen: torch.Generator):
    """Rows of 17 bins at `scale`: z = scale everywhere but z_0 = 0 (target 7.5: the true
    loss is log 16), then rows of logits spread below `scale`, with targets across the bins.
    More than a block of 16 rows, and a tail, so both CPU walks take part."""
    scale = _largest_logit(dtype, scale)
    flat = torch.full((1, NUM_BINS), scale)
    flat[0, 0] = 0.0
    # Below the maximum, so that float16 stays finite at its largest value.
    noisy = scale - 3.0 * torch.randn(36, NUM_BINS, generator=gen).abs() * max(1.0, scale * 1e-3)
    pred = torch.cat([flat, noisy]).to(dtype)
    target = torch.cat([torch.tensor([7.5]), torch.rand(36, generator=gen) * (NUM_BINS - 1)])
    target[1:4] = torch.tensor([0.0, 0.25, NUM_BINS - 1.0])
    return pred, target.to(accumulate_dtype(dtype))


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    # The loss is computed in float32 (float64 for float64 pred) from exact inputs: a few
    # units of that type relative to the loss, or to 1 where the loss is below 1.
    tolerance = 64 * torch.finfo(accumulate_dtype(dtype)).eps
    error = (actual.double() - expected).abs() / expected.abs().clamp(min=1.0)
    assert torch.isfinite(actual).all(), actual
    assert error.max() <= tolerance, (
        f"relative error {error.max().item():.3g} > {tolerance:.3g}: {actual[:4]} vs {expected[:4]}"
    )


def _check_dfl_large_logits(backend: str, device: str, dtype: torch.dtype, scale: float):
    gen = make_generator("dfl-large-logits", dtype, scale)
    pred, target = _large_logit_rows(dtype, scale, gen)
    expected = _dfl_reference(pred, target)
    assert abs(expected[0].item() - torch.tensor(16.0, dtype=torch.float64).log().item()) < 1e-12
    loss = gfl_ops.distribution_focal_loss(pred.to(device), target.to(device), reduction="none", backend=backend)
    _assert_close_relative(loss.cpu(), expected, dtype)
    # The gradient, softmax_k - w_l [k = i] - w_r [k = i + 1], is relative to the maximum already.
    leaf = pred.to(device, copy=True).requires_grad_()
    gfl_ops.distribution_focal_loss(leaf, target.to(device), reduction="sum", backend=backend).backward()
    reference_leaf = pred.to(torch.float64, copy=True).requires_grad_()
    _dfl_reference(reference_leaf, target).sum().backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), reference_leaf.grad, rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("scale", [1e5, 1e7, 1e38], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_dfl_large_logits_native(device, dtype, scale):
    _check_dfl_large_logits("native", device, dtype, scale)


@pytest.mark.parametrize("scale", [1e5, 1e7, 1e38], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_dfl_large_logits_triton(device, dtype, scale):
    if gfl_ops.triton.IMPORT_ERROR is not None:
        pytest.skip(f"Triton does not import: {gfl_ops.triton.IMPORT_ERROR}")
    if not gfl_ops.triton.available(device):
        pytest.skip(f"the Triton backend does not run on {device} here (CPU: make test-triton-interpreter)")
    _check_dfl_large_logits("triton", device, dtype, scale)


# --------------------------------------------------------------------------------------
# QFL with beta near FLT_MAX
# --------------------------------------------------------------------------------------


def _qfl_reference_float32(pred: torch.Tensor, label: torch.Tensor, score: torch.Tensor, beta: float) -> torch.Tensor:
    """torch's own float32 maths: |sigmoid(x) - y|^beta * BCE(x, y), summed over classes."""
    classes = torch.arange(pred.shape[1])
    y = torch.where(label[:, None] == classes[None, :], score[:, None], torch.zeros(()))
    factor = (pred.sigmoid() - y).abs().pow(beta)
    return (factor * F.binary_cross_entropy_with_logits(pred, y, reduction="none")).sum(dim=1)


@pytest.mark.parametrize("beta", [1e38, 3e38], ids=lambda b: f"{b:g}")
def test_qfl_huge_beta(beta):
    """|d|^beta for beta near FLT_MAX: 0 where |d| < 1, 1 where |d| = 1 (a logit far enough
    out that sigmoid is 0 or 1 in float32 with the opposite target), no NaN."""
    gen = make_generator("qfl-huge-beta", beta)
    num_anchors, num_classes = 64, 20
    pred = 3.0 * torch.randn(num_anchors, num_classes, generator=gen)  # no sigmoid rounds to 0 or 1
    pred[:4] = torch.tensor([-200.0, -120.0, 150.0, 300.0])[:, None]  # saturated sigmoid
    label = torch.randint(0, num_classes + 1, (num_anchors,), generator=gen)
    label[:4] = torch.tensor([3, 4, num_classes, num_classes])  # y = 1 on a class of the first two
    score = torch.rand(num_anchors, generator=gen)
    score[:2] = 1.0
    expected = _qfl_reference_float32(pred, label, score, beta)
    assert torch.isfinite(expected).all() and (expected[:2] > 100).all() and (expected[4:] == 0).all()
    loss = gfl_ops.quality_focal_loss(pred, label, score, beta=beta, reduction="none", backend="native")
    assert not loss.isnan().any(), loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Gradient where no sigmoid saturates (where one does, torch's pow backward is inf * 0).
    leaf = pred[4:].clone().requires_grad_()
    gfl_ops.quality_focal_loss(leaf, label[4:], score[4:], beta=beta, reduction="sum", backend="native").backward()
    reference_leaf = pred[4:].clone().requires_grad_()
    _qfl_reference_float32(reference_leaf, label[4:], score[4:], beta).sum().backward()
    assert torch.isfinite(reference_leaf.grad).all()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-5, atol=1e-6)


CONSTANT_WEIGHT_CASES = {
    "focal_gamma_0": lambda pred, target, backend: gfl_ops.sigmoid_focal_loss(
        pred, target, alpha=None, gamma=0.0, reduction="sum", backend=backend
    ),
    "qfl_dense_beta_0": lambda pred, target, backend: gfl_ops.quality_focal_loss_dense(
        pred, target, beta=0.0, reduction="sum", backend=backend
    ),
    "varifocal_detached": lambda pred, target, backend: gfl_ops.varifocal_loss(
        pred, target, detach_weight=True, reduction="sum", backend=backend
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CONSTANT_WEIGHT_CASES))
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_infinite_logits_with_a_constant_weight_have_the_reference_gradient(device, backend, case, dtype):
    """Where the modulating weight is constant, an infinite logit's gradient is w (sigma - t),
    as torch's BCE with logits and the reference give it (0.75, 1.0, ...), not NaN from its
    infinite BCE times the weight's zero derivative."""
    if backend not in gfl_ops.available_backends(device):
        pytest.skip(f"{backend} does not run on {device} here")
    inf = float("inf")
    pred = torch.tensor([[inf, -inf, 2.0], [-inf, inf, -1.0]], dtype=dtype, device=device)
    target = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]], dtype=dtype, device=device)
    gradients = {}
    for name in (backend, "reference"):
        leaf = pred.clone().requires_grad_()
        CONSTANT_WEIGHT_CASES[case](leaf, target, name).backward()
        gradients[name] = leaf.grad
    assert torch.isfinite(gradients["reference"]).all()
    torch.testing.assert_close(gradients[backend], gradients["reference"], rtol=1e-6, atol=1e-7)
    if case != "varifocal_detached":  # BCE with logits itself
        bce = pred.clone().requires_grad_()
        F.binary_cross_entropy_with_logits(bce, target, reduction="sum").backward()
        torch.testing.assert_close(gradients[backend], bce.grad, rtol=1e-6, atol=1e-7)


VARIFOCAL_POSITIVE_BACKENDS = [
    "native",
    pytest.param(
        "triton",
        marks=pytest.mark.xfail(
            strict=True,
            reason="Triton gives a positive's constant weight dw/dp = 0, not the term left out "
            "(kernels.class_element: each select that would leave it out made a variant spill under Triton 3.6)",
        ),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", VARIFOCAL_POSITIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_infinite_logits_on_varifocal_positives_have_the_reference_gradient(device, backend, dtype):
    """A varifocal positive's weight is t (or 1), a constant even with detach_weight=False:
    an infinite logit there has the gradient t (p - t), as the reference's autograd gives
    it, not NaN. (On the negatives the weight varies, and torch's own gradient there is NaN.)"""
    if backend not in gfl_ops.available_backends(device):
        pytest.skip(f"{backend} does not run on {device} here")
    inf = float("inf")
    pred = torch.tensor([[-inf, 2.0, inf], [inf, -1.0, -inf]], dtype=dtype, device=device)
    target = torch.tensor([[0.5, 0.0, 0.25], [0.75, 0.0, 1.0]], dtype=dtype, device=device)
    gradients = {}
    for name in (backend, "reference"):
        leaf = pred.clone().requires_grad_()
        gfl_ops.varifocal_loss(leaf, target, reduction="sum", backend=name).backward()
        gradients[name] = leaf.grad
    assert torch.isfinite(gradients["reference"]).all()
    torch.testing.assert_close(gradients[backend], gradients["reference"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Huge general exponents
# --------------------------------------------------------------------------------------

HUGE_EXPONENT_CASES = {
    "focal": lambda pred, target, gamma, backend: gfl_ops.sigmoid_focal_loss(
        pred, target, gamma=gamma, reduction="sum", backend=backend
    ),
    "qfl_dense": lambda pred, target, gamma, backend: gfl_ops.quality_focal_loss_dense(
        pred, target, beta=gamma, reduction="sum", backend=backend
    ),
    "varifocal": lambda pred, target, gamma, backend: gfl_ops.varifocal_loss(
        pred, target, gamma=gamma, reduction="sum", backend=backend
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [2.5, 1e9, 1e30], ids=lambda g: f"{g:g}")
@pytest.mark.parametrize("case", sorted(HUGE_EXPONENT_CASES))
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_huge_exponents_match_float64(device, backend, case, gamma):
    """float32 loss and gradient equal the float64 reference's on the same inputs. At x = 20
    and t = 0 the float64 weight sigma(20)^1e9 is 0.127 and the gradient 4.03 (0 at 1e30);
    from the rounded m = 1 the kernels gave 1 and 31.67 (3.1e22 at 1e30)."""
    if backend not in gfl_ops.available_backends(device):
        pytest.skip(f"{backend} does not run on {device} here")
    pred = torch.tensor([[20.0, -20.0, 3.0, -1.5], [16.0, 0.5, -30.0, 9.0]], device=device)
    target = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], device=device)
    if case == "focal":
        target[0, 2] = 0.3  # a soft target: 1 - p_t from p t + (1 - p)(1 - t)
    results = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        leaf = pred.to(dtype, copy=True).requires_grad_()
        loss = HUGE_EXPONENT_CASES[case](leaf, target.to(dtype), gamma, name)
        loss.backward()
        results[name] = (loss.detach(), leaf.grad)
    (loss, grad), (expected_loss, expected_grad) = results[backend], results["reference"]
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
