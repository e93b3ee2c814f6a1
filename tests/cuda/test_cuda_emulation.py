"""The CUDA kernels (csrc/cuda/gfl_kernels.cuh) on a machine without a GPU, run under the
emulator of the CUDA execution model (tests/_cuda_emulation.py, tests/cuda/cuda_emulation/):

- the emulator's own self-test (it must catch what a GPU would: barrier and shuffle
  divergence, deadlocks, misaligned vector accesses);
- what the suite's small inputs do not reach. The rows walk's vector accesses (taken
  exactly when every row is aligned, exact counts), reads next to NaN-filled memory on
  every side of pred and of a dense target (no out-of-bounds read reaches a result), and
  inputs larger than the emulated grid (three blocks), so every grid-stride loop wraps and
  reduction "sum" adds up several blocks' sums.

`make test-emulated` runs the whole suite once more with backend="native" sent to the
emulated kernels and the gradient in the backward pass (CUDA's GRADIENT_PASS): parity with
the reference, gradcheck, opcheck, torch.compile, reductions, errors, on the CUDA code path
(tests/conftest.py routes the operators when GFL_OPS_TEST_CUDA_EMULATION=1).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import _cuda_emulation
import gfl_ops
from _helpers import (
    FLOAT_DTYPES,
    accumulate_dtype,
    anchor_shape,
    check_parity,
    dtype_id,
    make_dfl_target,
    make_generator,
    make_labels,
    make_scores,
)

pytestmark = pytest.mark.emulated
TESTS = Path(__file__).resolve().parent
# Elements per 16-byte vector.
VECTOR = {torch.float64: 2, torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}


@pytest.fixture(scope="module")
def emulated():
    reason = _cuda_emulation.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return _cuda_emulation.load()


@pytest.fixture
def emulated_native(emulated, monkeypatch):
    """backend="native" runs the emulated CUDA kernels, for one test."""
    monkeypatch.setattr(gfl_ops._ops, "operator", _cuda_emulation.emulated_operator_lookup(gfl_ops._ops.operator))
    _cuda_emulation.take_wide_access_count()  # start from zero
    return emulated


def test_the_emulator_catches_what_a_gpu_would(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler (c++ or $CXX)")
    binary = tmp_path / "emulator_selftest"
    source = TESTS / "cuda_emulation" / "emulator_selftest.cpp"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)],
        check=True,
        timeout=300,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "self-test passed" in result.stdout


# --------------------------------------------------------------------------------------
# The rows walk's vector accesses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_grad", [True, False], ids=["with_grad", "loss_only"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced_to_a_vector_multiple"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_aligned_rows_are_read_and_written_in_whole_vectors(emulated_native, dtype, layout, compute_grad):
    """Every row aligned to 16 bytes and C a multiple of the vector: each lane loads (and
    stores) whole vectors, exactly N * C / V of each, and the results match the reference."""
    vector = VECTOR[dtype]
    classes = 2 * 8  # a multiple of every dtype's vector
    gen = make_generator("aligned-rows", dtype, layout)
    values = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).mul(3).to(dtype)  # noqa: E731
    if layout == "contiguous":
        pred = values(37, classes)
    elif layout == "channels_last":
        pred = values(2, 3, 5, classes).permute(0, 3, 1, 2)
    else:  # rows of 24 elements, of which the first 16 are the classes
        pred = values(37, classes + 8)[:, :classes]
    label = make_labels(anchor_shape(pred), classes, gen, "cpu")
    score = make_scores(anchor_shape(pred), accumulate_dtype(dtype), gen, "cpu")

    emulated_native._quality_focal_loss_native(pred, label, score, None, None, 2.0, False, "none", compute_grad)
    num_anchors = pred.numel() // classes
    passes = 2 if compute_grad else 1  # pred read; gradient written
    assert _cuda_emulation.take_wide_access_count() == passes * num_anchors * classes // vector

    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
        pred,
        dict(reduction="none"),
        out_dtype=accumulate_dtype(dtype),
    )
    assert _cuda_emulation.take_wide_access_count() > 0  # the functional API took the vector walk too


def _shifted_by_one_element(pred):
    """pred's values in a buffer that starts one element later: no row is 16-byte aligned."""
    storage = torch.empty(pred.numel() + 1, dtype=pred.dtype)
    shifted = storage[1:].view(pred.shape)
    shifted.copy_(pred)
    return shifted


@pytest.mark.parametrize(
    "case", ["shifted_by_one", "classes_not_a_vector_multiple", "row_stride_not_a_multiple", "dense_target_shifted"]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_unaligned_rows_take_the_scalar_walk(emulated_native, dtype, case):
    """Where a vector access would be misaligned (on a GPU: a fault; here the emulator
    raises) the rows walk takes scalar accesses: none of 16 bytes, and the same results."""
    gen = make_generator("unaligned-rows", dtype, case)
    values = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).mul(3).to(dtype)  # noqa: E731
    classes = 13 if case == "classes_not_a_vector_multiple" else 16
    if case == "row_stride_not_a_multiple":
        pred = values(21, classes + 1)[:, :classes]
    else:
        pred = values(21, classes)
    if case == "shifted_by_one":
        pred = _shifted_by_one_element(pred)
    target = torch.where(torch.rand(pred.shape, generator=gen) < 0.3, torch.rand(pred.shape, generator=gen), 0.0)
    target = target.to(dtype)
    if case == "dense_target_shifted":
        target = _shifted_by_one_element(target)
    check_parity(
        lambda p, backend, **kw: gfl_ops.quality_focal_loss_dense(p, target, backend=backend, **kw),
        pred,
        dict(reduction="none", beta=1.5),
        out_dtype=accumulate_dtype(dtype),
    )
    assert _cuda_emulation.take_wide_access_count() == 0


# --------------------------------------------------------------------------------------
# No out-of-bounds read reaches a result
# --------------------------------------------------------------------------------------


def _inside_nan_guard(values, guard):
    """`values` (2-D) copied into the middle of a NaN-filled buffer with `guard` rows and
    columns of NaN on every side: any read outside `values` turns a result into NaN."""
    rows, columns = values.shape
    buffer = torch.full((rows + 2 * guard, columns + 2 * guard), float("nan"), dtype=values.dtype)
    inside = buffer[guard : guard + rows, guard : guard + columns]
    inside.copy_(values)
    return inside


@pytest.mark.parametrize("guard", [8, 1], ids=["vector_aligned_guard", "unaligned_guard"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_no_read_outside_pred_or_the_targets(emulated_native, dtype, guard):
    """pred, a dense target, DFL's bins and the integral's rows surrounded by NaN. With a
    guard of 8 elements (16-byte aligned for float16, 32 bytes for float32) the QFL rows walk
    reads whole vectors next to the NaN; with 1 it reads element by element."""
    gen = make_generator("nan-guard", dtype, guard)
    values = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).mul(3).to(dtype)  # noqa: E731
    pred = _inside_nan_guard(values(29, 24), guard)
    label = make_labels((29,), 24, gen, "cpu")  # background labels include -100, 24 and 10**6
    score = make_scores((29,), accumulate_dtype(dtype), gen, "cpu")
    soft = torch.rand(29, 24, generator=gen, dtype=torch.float64).to(dtype)
    target = _inside_nan_guard(soft, guard)
    out_dtype = accumulate_dtype(dtype)
    for reduction in ("none", "sum"):
        check_parity(
            lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
            pred,
            dict(reduction=reduction),
            out_dtype=out_dtype,
        )
        check_parity(
            lambda p, backend, **kw: gfl_ops.quality_focal_loss_dense(p, target, backend=backend, **kw),
            pred,
            dict(reduction=reduction),
            out_dtype=out_dtype,
        )
    bins = _inside_nan_guard(values(23, 17), guard)
    dfl_target = make_dfl_target(23, 17, out_dtype, gen, "cpu")
    check_parity(
        lambda p, backend, **kw: gfl_ops.distribution_focal_loss(p, dfl_target, backend=backend, **kw),
        bins,
        dict(reduction="none"),
        out_dtype=out_dtype,
    )
    check_parity(
        lambda p, backend: gfl_ops.distribution_integral(p, backend=backend),
        bins,
        {},
        out_dtype=dtype,
        grad_term_scale=16.0,
    )


# --------------------------------------------------------------------------------------
# Inputs larger than the grid
# --------------------------------------------------------------------------------------

GRID_THREADS = _cuda_emulation.MAX_BLOCKS * 256


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_inputs_larger_than_the_grid(emulated_native, dtype, reduction):
    """Every walk on more anchors (rows) than the capped grid has threads (lanes): grid-stride
    loops go round several times, and "sum" adds up three blocks' sums."""
    gen = make_generator("grid-wrap", dtype, reduction)
    out_dtype = accumulate_dtype(dtype)
    values = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).mul(3).to(dtype)  # noqa: E731
    cases = {
        # (B, C, H, W) in place: a thread per anchor, 2 * 20 * 25 = 1000 anchors.
        "thread_per_anchor": values(2, 3, 20, 25),
        # (N, 80): 32 lanes per anchor for float32 (16 for bfloat16), 24 (48) anchors a step.
        "rows": values(100, 80),
    }
    assert cases["thread_per_anchor"].numel() // 3 > GRID_THREADS
    for walk, pred in cases.items():
        shape = anchor_shape(pred)
        label = make_labels(shape, pred.shape[1], gen, "cpu")
        score = make_scores(shape, out_dtype, gen, "cpu")
        weight = torch.rand(shape, generator=gen, dtype=out_dtype) * 2
        check_parity(
            lambda p, backend, **kw: gfl_ops.quality_focal_loss(p, label, score, backend=backend, **kw),
            pred,
            dict(reduction=reduction, weight=weight),
            out_dtype=out_dtype,
        )
    rows = 2 * GRID_THREADS + 37
    bins = values(rows, 17)
    dfl_target = make_dfl_target(rows, 17, out_dtype, gen, "cpu")
    check_parity(
        lambda p, backend, **kw: gfl_ops.distribution_focal_loss(p, dfl_target, backend=backend, **kw),
        bins,
        dict(reduction=reduction),
        out_dtype=out_dtype,
    )
    if reduction == "none":
        check_parity(
            lambda p, backend: gfl_ops.distribution_integral(p, backend=backend),
            bins,
            {},
            out_dtype=dtype,
            grad_term_scale=16.0,
        )
