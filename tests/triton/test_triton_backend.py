"""The Triton backend (gfl_ops.triton, torch.ops.gfl_ops._<operator>_triton) against the
float64 reference, with the parity criterion of the native tests, on small inputs.

Triton kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, read when gfl_ops is imported): `make test-triton-interpreter` runs
this file's CPU cases that way, so that CPU-only machines check the Triton kernels too.
"""

import pytest
import torch

import gfl_ops
from _helpers import (
    DEVICES,
    accumulate_dtype,
    anchor_shape,
    check_parity,
    make_bin_pred,
    make_class_pred,
    make_dfl_target,
    make_generator,
    make_labels,
    make_scores,
)


def _require_triton(device):
    if gfl_ops.triton.IMPORT_ERROR is not None:
        pytest.skip(f"Triton does not import: {gfl_ops.triton.IMPORT_ERROR}")
    if not gfl_ops.triton.available(device):
        pytest.skip(f"the Triton backend does not run on {device} here (CPU needs TRITON_INTERPRET=1)")


DTYPES = [torch.float32, torch.float64, torch.float16]
CLASS_CASES = [("contiguous", 7, 5), ("nchw", (2, 2, 3), 4), ("channels_last", (1, 3, 2), 6), ("transposed", 5, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CLASS_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_qfl(device, dtype, case):
    _require_triton(device)
    layout, anchors, classes = case
    gen = make_generator("triton-qfl", dtype, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    label = make_labels(anchor_shape(pred), classes, gen, device)
    score = make_scores(anchor_shape(pred), accumulate_dtype(dtype), gen, device)
    target = (
        (torch.rand(pred.shape, generator=gen) * (torch.rand(pred.shape, generator=gen) < 0.4)).to(dtype).to(device)
    )
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
        pred,
        dict(reduction="none"),
        out_dtype=accumulate_dtype(dtype),
        backend="triton",
    )
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss_dense(p, backend=backend, **kw),
        pred,
        dict(target=target, beta=1.5, reduction="mean", avg_factor=3.0),
        out_dtype=accumulate_dtype(dtype),
        backend="triton",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dfl_and_integral(device, dtype, layout):
    _require_triton(device)
    gen = make_generator("triton-dfl", dtype, layout)
    pred = make_bin_pred(layout, 9, 17, dtype, device, gen)
    target = make_dfl_target(9, 17, accumulate_dtype(dtype), gen, device)
    check_parity(
        lambda p, backend, **kw: gfl_ops.distribution_focal_loss(p, backend=backend, **kw),
        pred,
        dict(target=target, reduction="none"),
        out_dtype=accumulate_dtype(dtype),
        backend="triton",
    )
    check_parity(
        lambda p, backend: gfl_ops.distribution_integral(p, backend=backend),
        pred,
        {},
        out_dtype=dtype,
        grad_term_scale=16,
        backend="triton",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_qfl_probabilities(device, dtype, beta):
    """activated=True (probability input) on a channel-first pred, every beta path."""
    _require_triton(device)
    gen = make_generator("triton-prob", dtype, beta)
    pred = make_class_pred("channels_last", (2, 3, 2), 7, dtype, device, gen, activated=True)
    label = make_labels(anchor_shape(pred), 7, gen, device)
    score = make_scores(anchor_shape(pred), accumulate_dtype(dtype), gen, device)
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
        pred,
        dict(reduction="none", beta=beta, activated=True),
        out_dtype=accumulate_dtype(dtype),
        backend="triton",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CLASS_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_focal_family(device, dtype, case):
    """Focal (labels, soft target) and varifocal (label and score, dense), reduction "none"
    (pred's shape), with class and element weights, the closed-form exponents and pow."""
    _require_triton(device)
    layout, anchors, classes = case
    gen = make_generator("triton-family", dtype, case)
    pred = make_class_pred(layout, anchors, classes, dtype, device, gen)
    label = make_labels(anchor_shape(pred), classes, gen, device)
    score = make_scores(anchor_shape(pred), accumulate_dtype(dtype), gen, device)
    target = (
        (torch.rand(pred.shape, generator=gen) * (torch.rand(pred.shape, generator=gen) < 0.4)).to(dtype).to(device)
    )
    class_weight = make_scores((classes,), accumulate_dtype(dtype), gen, device)
    element_weight = torch.rand(pred.shape, generator=gen).to(accumulate_dtype(dtype)).to(device)
    focal = lambda p, backend, **kw: gfl_ops.sigmoid_focal_loss(p, backend=backend, **kw)  # noqa: E731
    varifocal = lambda p, backend, **kw: gfl_ops.varifocal_loss(p, backend=backend, **kw)  # noqa: E731
    for call, inputs in (
        (focal, dict(target=label, reduction="none")),
        (focal, dict(target=target, gamma=1.5, class_weight=class_weight, reduction="sum")),
        (varifocal, dict(target=(label, score), weight=element_weight, reduction="none")),
        (varifocal, dict(target=target, gamma=2.5, detach_weight=True, reduction="mean", avg_factor=2.0)),
    ):
        check_parity(call, pred, inputs, out_dtype=accumulate_dtype(dtype), backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triton_sum_of_many_programs_in_both_gradient_passes(device, reduction, gradient_pass, set_gradient_pass):
    """Reduction "sum" adds up per-program sums (1100 anchors: 3 programs of 512 at C = 5;
    300 DFL rows: 3 programs of 128), with a weight, the gradient computed in the forward
    pass or in the backward pass (the shared autograd kernel hands the Triton kernel
    weight * d total / d loss)."""
    _require_triton(device)
    set_gradient_pass(device, gradient_pass)
    gen = make_generator("triton-sum", reduction, gradient_pass)
    pred = make_class_pred("contiguous", 1100, 5, torch.float32, device, gen)
    label = make_labels(anchor_shape(pred), 5, gen, device)
    score = make_scores(anchor_shape(pred), torch.float32, gen, device)
    weight = make_scores(anchor_shape(pred), torch.float32, gen, device)
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
        pred,
        dict(reduction=reduction, weight=weight),
        out_dtype=torch.float32,
        backend="triton",
    )
    bins = make_bin_pred("contiguous", 300, 17, torch.float16, device, gen)
    target = make_dfl_target(300, 17, torch.float32, gen, device)
    check_parity(
        lambda p, backend, **kw: gfl_ops.distribution_focal_loss(p, target, backend=backend, **kw),
        bins,
        dict(reduction=reduction, weight=weight[:300]),
        out_dtype=torch.float32,
        backend="triton",
    )
    check_parity(
        lambda p, backend: gfl_ops.distribution_integral(p, backend=backend),
        bins,
        {},
        out_dtype=torch.float16,
        grad_term_scale=16,
        backend="triton",
    )


@pytest.mark.parametrize("device", DEVICES)
def test_triton_reads_maps_whose_anchor_dimensions_do_not_merge(device):
    """A spatially sliced (B, C, H, W) map, (B, C, D, H, W) with a sliced middle dimension:
    three or four anchor groups of their own strides, read in place as the native kernels
    read them (the anchor layout of csrc/gfl_anchor_layout.cpp)."""
    _require_triton(device)
    gen = make_generator("triton-groups")
    maps = [
        torch.randn(2, 5, 6, 7, generator=gen).to(device)[:, :, ::2, 1:],
        torch.randn(2, 4, 3, 4, 5, generator=gen).to(device)[:, :, :, 1:3, ::2],
    ]
    for pred in maps:
        classes = pred.shape[1]
        label = make_labels(anchor_shape(pred), classes, gen, device)
        score = make_scores(anchor_shape(pred), torch.float32, gen, device)
        check_parity(
            lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
            pred,
            dict(reduction="none"),
            out_dtype=torch.float32,
            backend="triton",
        )
        target = torch.rand(pred.shape, generator=gen).to(device)
        check_parity(
            lambda p, backend, **kw: gfl_ops.quality_focal_loss_dense(p, target, backend=backend, **kw),
            pred,
            dict(reduction="sum", beta=1.5),
            out_dtype=torch.float32,
            backend="triton",
        )


@pytest.mark.parametrize("device", DEVICES)
def test_triton_compile_fullgraph(device):
    """A training step on backend="triton" compiles without a graph break and matches eager
    (the Triton kernels are operators with fake kernels: opaque to the compiler)."""
    _require_triton(device)
    torch._dynamo.reset()
    gen = make_generator("triton-compile")
    pred = make_class_pred("nchw", (2, 4, 4), 80, torch.float32, device, gen)
    label = make_labels(anchor_shape(pred), 80, gen, device)
    score = make_scores(anchor_shape(pred), torch.float32, gen, device)
    bins = make_bin_pred("contiguous", 16, 17, torch.float32, device, gen)
    target = make_dfl_target(16, 17, torch.float32, gen, device)

    def step(p, z):
        qfl = gfl_ops.quality_focal_loss(p, label, score, avg_factor=torch.tensor(3.0, device=device), backend="triton")
        dfl = gfl_ops.distribution_focal_loss(z, target, validate=False, backend="triton")
        return qfl + dfl + gfl_ops.distribution_integral(z, backend="triton").sum()

    eager_p, eager_z = pred.clone().requires_grad_(), bins.clone().requires_grad_()
    step(eager_p, eager_z).backward()
    compiled_p, compiled_z = pred.clone().requires_grad_(), bins.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(compiled_p, compiled_z).backward()
    torch.testing.assert_close(compiled_p.grad, eager_p.grad)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["compute_grad", "no_grad"])
def test_triton_opcheck(device, grad):
    """torch.library.opcheck on the Triton kernels torch.ops.gfl_ops._<operator>_triton (the
    native kernels' schemas and fake kernels), and on the public operators with
    backend="triton"."""
    _require_triton(device)
    for name, operator in gfl_ops._registry.OPERATORS.items():
        kernel_name = operator.kernel_name("triton")
        for sample in operator.samples(device, torch.float32, grad):
            kernel_args = gfl_ops._registry.positional("gfl_ops", kernel_name, sample)
            public_args = gfl_ops._registry.positional("gfl_ops", name, {**sample, "backend": "triton"})
            checks = [
                (getattr(torch.ops.gfl_ops, kernel_name).default, tuple(_detached(a) for a in kernel_args)),
                (getattr(torch.ops.gfl_ops, name).default, public_args),
            ]
            for op, op_args in checks:
                result = torch.library.opcheck(op, op_args)
                failed = {test: outcome for test, outcome in result.items() if outcome != "SUCCESS"}
                assert not failed, f"{op}: {failed}"


def _detached(argument):
    return argument.detach() if isinstance(argument, torch.Tensor) else argument
