"""The two ways to a gradient of the autograd kernel (csrc/gfl_autograd.cpp, the gradient pass):
computed in the forward pass and scaled in backward (the CPU default), or computed in the
backward pass with the incoming gradient folded into the kernel's per-anchor weight (the CUDA
default). Both must give the reference's gradients."""

import pytest
import torch

import gfl_ops
from gfl_ops import bench
from _helpers import (
    accumulate_dtype,
    anchor_shape,
    assert_parity,
    check_parity,
    make_bin_pred,
    make_class_pred,
    make_dfl_target,
    make_generator,
    make_labels,
    make_scores,
)

OPS = torch.ops.gfl_ops


@pytest.fixture
def gradient_in_backward(set_gradient_pass):
    set_gradient_pass("cpu", "backward")


def _calls(dtype, gen):
    """(name, pred, fn(pred, **kwargs)) for every loss, on a layout that exercises strides."""
    pred = make_class_pred("channels_last", (2, 3, 2), 5, dtype, "cpu", gen)
    label = make_labels(anchor_shape(pred), 5, gen, "cpu")
    score = make_scores(anchor_shape(pred), accumulate_dtype(dtype), gen, "cpu")
    target = torch.rand(pred.shape, generator=gen).to(dtype)
    bins = make_bin_pred("transposed", 7, 6, dtype, "cpu", gen)
    dfl_target = make_dfl_target(7, 6, accumulate_dtype(dtype), gen, "cpu")
    return [
        ("qfl", pred, lambda p, **kw: gfl_ops.quality_focal_loss(p, label, score, **kw)),
        ("qfl_dense", pred, lambda p, **kw: gfl_ops.quality_focal_loss_dense(p, target, beta=1.5, **kw)),
        ("dfl", bins, lambda p, **kw: gfl_ops.distribution_focal_loss(p, dfl_target, **kw)),
    ]


def _options(name, pred, gen, reduction, weighting):
    shape = anchor_shape(pred) if name != "dfl" else (pred.shape[0],)
    options = dict(reduction=reduction)
    if weighting != "none":
        weight = torch.rand(shape, generator=gen, dtype=accumulate_dtype(pred.dtype))
        options["weight"] = weight.requires_grad_() if weighting == "weight_requires_grad" else weight
    if reduction == "mean":
        options["avg_factor"] = torch.tensor(3.5)
    return options


@pytest.mark.parametrize("weighting", ["none", "constant", "weight_requires_grad"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_with_the_gradient_in_backward(gradient_in_backward, reduction, weighting):
    gen = make_generator("pass-gradcheck", reduction, weighting)
    for name, pred, call in _calls(torch.float64, gen):
        options = _options(name, pred, gen, reduction, weighting)
        pred = pred.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda p: call(p, backend="native", **options), (pred,)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_parity_with_the_gradient_in_backward(gradient_in_backward, dtype, reduction):
    gen = make_generator("pass-parity", dtype, reduction)
    for name, pred, call in _calls(dtype, gen):
        options = _options(name, pred, gen, reduction, "constant")
        check_parity(lambda p, **kw: call(p, **kw), pred, options, out_dtype=accumulate_dtype(dtype))


def test_both_passes_give_the_same_gradient(set_gradient_pass):
    gen = make_generator("pass-same")
    for name, pred, call in _calls(torch.float32, gen):
        options = _options(name, pred, gen, "mean", "constant")
        grads = {}
        for gradient_pass in ("forward", "backward"):
            set_gradient_pass("cpu", gradient_pass)
            p = pred.detach().requires_grad_()
            (call(p, backend="native", **options) * 3.0).backward()
            grads[gradient_pass] = p.grad
        torch.testing.assert_close(grads["backward"], grads["forward"], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
def test_direct_operators_return_only_what_was_asked_for(set_gradient_pass, gradient_pass):
    """The public operator returns the loss alone: the gradient buffer of the forward pass is
    autograd's, never an output, so no tensor a caller holds changes under a backward. The
    kernel returns fresh (loss, grad) tensors that nothing modifies afterwards."""
    set_gradient_pass("cpu", gradient_pass)
    gen = make_generator("pass-direct", gradient_pass)
    pred = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    label, score = make_labels((6,), 4, gen, "cpu"), make_scores((6,), torch.float64, gen, "cpu")
    loss = OPS.quality_focal_loss(pred, label, score, None, None, 2.0, False, "sum")
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    kernel_loss, kernel_grad = OPS._quality_focal_loss_native(
        pred.detach(), label, score, None, None, 2.0, False, "sum", True
    )
    held = kernel_grad.clone()
    (loss * 5.0).backward()
    assert torch.equal(kernel_grad, held)
    reference = gfl_ops.quality_focal_loss(pred, label, score, reduction="sum", backend="reference")
    (expected,) = torch.autograd.grad(reference * 5.0, pred)
    torch.testing.assert_close(pred.grad, expected)
    torch.testing.assert_close(pred.grad, 5.0 * held)
    torch.testing.assert_close(loss.detach(), kernel_loss)
    bins = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    value = OPS.distribution_integral(bins)
    upstream = torch.randn(5, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(value, bins, upstream)
    (expected,) = torch.autograd.grad(gfl_ops.reference.distribution_integral(bins), bins, upstream)
    torch.testing.assert_close(got, expected)


def test_double_backward_with_the_gradient_in_backward_raises(gradient_in_backward):
    pred = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    loss = gfl_ops.distribution_focal_loss(pred, torch.rand(5, dtype=torch.float64) * 5, backend="native")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, pred, create_graph=True)


def test_compiled_training_step_with_the_gradient_in_backward(gradient_in_backward):
    """torch.compile(fullgraph=True) of a training step traces the recomputing backward."""
    from test_compile import test_compiled_training_step_equals_eager

    test_compiled_training_step_equals_eager("cpu")


@pytest.mark.parametrize("op", ["qfl", "dfl"])
def test_a_step_with_the_gradient_in_backward_holds_one_buffer_of_preds_size(gradient_in_backward, op):
    case = bench.Case(op, 4096, 80 if op == "qfl" else 17, "nc" if op == "qfl" else "rows", torch.float32)
    inputs = bench.make_inputs(case, torch.device("cpu"))
    fn = bench.make_provider("native", case, torch.device("cpu"))
    bench.run_step(fn, inputs, "full")
    bench.clear_grad(inputs)
    peak = bench.peak_extra_bytes(lambda: bench.run_step(fn, inputs, "full"), torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler does not report CPU allocations")
    # The gradient, and the recomputing call's per-anchor weight (1/C of pred).
    assert case.pred_bytes <= peak <= case.pred_bytes * (1 + 1.5 / case.classes), peak / case.pred_bytes


def test_float16_gradients_keep_the_small_values_a_loss_scaler_lifts():
    """AMP's float16 training: GradScaler multiplies the loss by 2^16, so a per-element
    gradient of 1e-9 becomes 6.6e-5, well inside float16's range. Stored in float16 before
    that scale (the forward gradient pass) it would round to 0; the reference rounds the
    scaled gradient once. float16 pred therefore takes the backward pass on every device:
    no more zeros than the reference, and the reference's values."""
    gen = make_generator("fp16-scaled")
    num_anchors, num_classes = 512, 80
    # Confident background logits around -6: d loss / d x ~ 3 sigma^3 ~ 4e-8 per element,
    # below float16's smallest subnormal (6e-8) once divided by avg_factor.
    pred = (torch.randn(num_anchors, num_classes, generator=gen) * 0.5 - 6.0).to(torch.float16)
    label = make_labels((num_anchors,), num_classes, gen, "cpu", positive_fraction=0.05)
    score = make_scores((num_anchors,), torch.float32, gen, "cpu")
    loss_scale, avg_factor = 65536.0, 40.0
    grads = {}
    for backend in ("native", "reference"):
        leaf = pred.detach().requires_grad_()
        loss = gfl_ops.quality_focal_loss(leaf, label, score, avg_factor=avg_factor, backend=backend)
        (loss * loss_scale).backward()
        grads[backend] = leaf.grad
    pred64 = pred.double().requires_grad_()
    loss64 = gfl_ops.quality_focal_loss(pred64, label, score.double(), avg_factor=avg_factor, backend="reference")
    (exact,) = torch.autograd.grad(loss64 * loss_scale, pred64)
    reference_zeros = int((grads["reference"] == 0).sum())
    assert reference_zeros < exact.numel() // 2, "a bad test input: the reference flushes most values too"
    assert int((grads["native"] == 0).sum()) <= reference_zeros
    assert_parity("scaled float16 gradient", grads["native"], exact, [grads["reference"]])


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
def test_float16_integral_gradient_is_rounded_once_after_its_scale(set_gradient_pass, gradient_pass):
    """The integral's float16 gradient, like the losses', is written scaled by the incoming
    gradient (the kernel's grad_scale) and rounded once: p = [12, 0, -8] has dE/dz_2 ~ 4e-9,
    0 in float16 but 4.1e-6 once scaled by 1000. Either gradient pass setting: float16
    always takes the backward pass."""
    set_gradient_pass("cpu", gradient_pass)
    backends = [b for b in gfl_ops.available_backends("cpu", "distribution_integral") if b != "reference"]
    gen = make_generator("fp16-integral")
    pred = torch.cat([torch.tensor([[12.0, 0.0, -8.0] + [-8.0] * 14]), torch.randn(4095, 17, generator=gen) * 6])
    pred = pred.to(torch.float16)
    pred64 = pred.double().requires_grad_()
    (exact,) = torch.autograd.grad(gfl_ops.reference.distribution_integral(pred64), pred64, torch.full((4096,), 1000.0))
    upstream = torch.full((4096,), 1000.0, dtype=torch.float16)
    reference = pred.detach().requires_grad_()
    gfl_ops.distribution_integral(reference, backend="reference").backward(upstream)  # rounded once
    # Values the reference keeps, clear of float16's flush-to-zero edge (2^-24 ~ 6e-8).
    kept = reference.grad.abs() >= 2.0**-23
    rounded_before_scale = torch.ops.gfl_ops._distribution_integral_native(pred, None, True)[1] * 1000.0
    lost_before_scale = int(((rounded_before_scale == 0) & kept).sum())
    assert lost_before_scale > 1000, "a bad test input: the gradient rounded before its scale loses little"
    for backend in backends:
        leaf = pred.detach().requires_grad_()
        gfl_ops.distribution_integral(leaf, backend=backend).backward(upstream)
        assert float(leaf.grad[0, 2]) == pytest.approx(float(exact[0, 2]), rel=1e-2), backend
        lost = int(((leaf.grad == 0) & kept).sum())
        assert lost == 0, f"{backend}: {lost} gradient entries flushed to 0 ({lost_before_scale} when rounded first)"
        assert_parity("scaled float16 integral gradient", leaf.grad, exact, [reference.grad])
