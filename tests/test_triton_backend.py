"""The Triton backend (gfl_ops.triton, torch.ops.gfl_ops.*_triton) against the float64
reference, with the parity criterion of the native tests, on small inputs.

Triton kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, read when gfl_ops is imported). On a CPU-only machine the suite runs
this file once more in a subprocess with the interpreter (test_triton_under_the_interpreter).
"""
import os
import subprocess
import sys

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
    target = (torch.rand(pred.shape, generator=gen) * (torch.rand(pred.shape, generator=gen) < 0.4)).to(dtype).to(device)
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
        pred, dict(reduction="none"), out_dtype=accumulate_dtype(dtype), backend="triton",
    )
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss_dense(p, backend=backend, **kw),
        pred, dict(target=target, beta=1.5, reduction="mean", avg_factor=3.0), out_dtype=accumulate_dtype(dtype),
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
        pred, dict(target=target, reduction="none"), out_dtype=accumulate_dtype(dtype), backend="triton",
    )
    check_parity(
        lambda p, backend: gfl_ops.distribution_integral(p, backend=backend),
        pred, {}, out_dtype=dtype, grad_term_scale=16, backend="triton",
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
        pred, dict(reduction="none", beta=beta, activated=True), out_dtype=accumulate_dtype(dtype),
        backend="triton",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of triton_ops needs a GPU (no GPU here)")
def test_triton_compile_fullgraph():
    """A training step on backend="triton" compiles without a graph break and matches eager."""
    _require_triton("cuda")
    gen = make_generator("triton-compile")
    pred = make_class_pred("nchw", (2, 4, 4), 80, torch.float32, "cuda", gen)
    label = make_labels(anchor_shape(pred), 80, gen, "cuda")
    score = make_scores(anchor_shape(pred), torch.float32, gen, "cuda")
    bins = make_bin_pred("contiguous", 16, 17, torch.float32, "cuda", gen)
    target = make_dfl_target(16, 17, torch.float32, gen, "cuda")

    def step(p, z):
        qfl = gfl_ops.quality_focal_loss(p, label, score, avg_factor=torch.tensor(3.0, device="cuda"), backend="triton")
        dfl = gfl_ops.distribution_focal_loss(z, target, validate=False, backend="triton")
        return qfl + dfl + gfl_ops.distribution_integral(z, backend="triton").sum()

    eager_p, eager_z = pred.clone().requires_grad_(), bins.clone().requires_grad_()
    step(eager_p, eager_z).backward()
    compiled_p, compiled_z = pred.clone().requires_grad_(), bins.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(compiled_p, compiled_z).backward()
    torch.testing.assert_close(compiled_p.grad, eager_p.grad)
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)


def test_triton_under_the_interpreter():
    """This file again, in a subprocess with TRITON_INTERPRET=1, so the Triton kernels are
    checked on CPU-only machines too."""
    if gfl_ops.triton.IMPORT_ERROR is not None:
        pytest.skip(f"Triton does not import: {gfl_ops.triton.IMPORT_ERROR}")
    if gfl_ops.triton.INTERPRETER:
        pytest.skip("already under the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter and not opcheck and cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["compute_grad", "no_grad"])
def test_triton_opcheck(device, grad):
    """torch.library.opcheck on the torch.ops.gfl_ops.*_triton operators (CUDA: under the CPU
    interpreter, fake-tensor tracing of a triton_op runs the interpreted kernel on meta
    tensors and fails, as torch.compile of the Triton backend does there)."""
    _require_triton(device)
    if device == "cpu":
        pytest.skip("Triton's CPU interpreter cannot trace triton_ops with fake tensors (opcheck, torch.compile)")
    from test_opcheck import SAMPLES

    for name, samples in SAMPLES.items():
        op = getattr(torch.ops.gfl_ops, f"{name}_triton").default
        for args in samples(device, torch.float32, grad):
            result = torch.library.opcheck(op, args)
            failed = {test: outcome for test, outcome in result.items() if outcome != "SUCCESS"}
            assert not failed, f"{name}_triton: {failed}"
