"""The CUDA kernels' machine code in the built extension, read without a GPU
(tools/cuda_machine_code.py: cuobjdump's resource usage and SASS of gfl_ops._C).

- the rows kernels that read 16-byte vectors of pred (every aligned-rows variant) load them
  with LDG.E.128, and those that write a gradient store it with STG.E.128 only: compared
  with the same kernel without the gradient, a gradient adds 128-bit stores and nothing else;
- no kernel uses local memory; a stack frame only where the kernel calls a subroutine (the
  values that live across the call), within call_frame_budget (32 bytes; 64 for a general
  exponent's three library calls), and none in the
  headline kernels;
- no kernel needs more than REGISTER_BUDGET registers (two blocks of 256 threads per SM);
- the committed table, benchmarks/results/machine-code/cuda.json, lists the kernels of
  this build (python -m tools.cuda_machine_code regenerates it).

Where the extension was built without CUDA these skip, unless GFL_OPS_REQUIRE_CUDA_BUILD=1
(make test sets it: CI builds the CUDA kernels for sm_90, and must check them).
"""

from __future__ import annotations

import json
import os

import pytest

import gfl_ops
from tools import cubin, cuda_machine_code

pytestmark = pytest.mark.machine_code


def _unavailable_reason():
    if not gfl_ops._ops.native_loaded():
        return f"gfl_ops's native library is not built: {gfl_ops._ops.NATIVE_IMPORT_ERROR}"
    if not gfl_ops._ops.has_native_kernel("quality_focal_loss", "cuda"):
        return "gfl_ops._C was built without its CUDA kernels (no nvcc or a CPU build of torch)"
    if cubin.cuobjdump() is None:
        return "no cuobjdump (Triton's wheel or the CUDA toolkit has it)"
    return None


@pytest.fixture(scope="module")
def table():
    reason = _unavailable_reason()
    if reason is not None:
        if os.environ.get("GFL_OPS_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail(f"GFL_OPS_REQUIRE_CUDA_BUILD=1, but {reason}")
        pytest.skip(reason)
    return cuda_machine_code.table()


def _class_rows(table, **where):
    return [
        row
        for row in table
        if row["kernel"] == "class_rows_kernel" and all(row[key] == value for key, value in where.items())
    ]


def _without_gradient(row):
    return tuple(
        (key, False if key == "need_grad" else value)
        for key, value in sorted(row.items())
        if key in ("arch", "modulation", "exponent", "activated", "element_io", "vector", "dtype", "target")
    )


def test_every_kernel_is_named(table):
    """Each kernel family is in the table, and every kernel's variant was read from its name."""
    assert {row["kernel"] for row in table} == {
        "class_rows_kernel",
        "class_thread_per_anchor_kernel",
        "dfl_kernel",
        "integral_kernel",
        "sum_kernel",
    }
    assert len(_class_rows(table)) > 100


def test_vector_rows_load_16_bytes(table):
    vector_rows = [row for row in _class_rows(table) if row["vector"] > 1]
    assert len(vector_rows) > 50
    assert not [row["name"] for row in vector_rows if not row["loads"].get("128")]


def test_vector_rows_store_the_gradient_in_16_bytes(table):
    """What the gradient adds to a vector rows kernel's stores: STG.E.128 and nothing else."""
    without = {_without_gradient(row): row["stores"] for row in _class_rows(table, need_grad=False)}
    with_gradient = [row for row in _class_rows(table, need_grad=True) if row["vector"] > 1]
    assert len(with_gradient) > 50
    for row in with_gradient:
        baseline = without[_without_gradient(row)]
        added = {
            bits: row["stores"].get(bits, 0) - baseline.get(bits, 0) for bits in set(row["stores"]) | set(baseline)
        }
        added = {bits: count for bits, count in added.items() if count}
        assert added and set(added) == {"128"} and added["128"] > 0, (row["name"], row["stores"], baseline)


def test_no_local_memory_and_stack_frames_only_around_calls(table):
    assert not [row["name"] for row in table if row["local_bytes"]]
    framed = [row for row in table if row["stack_bytes"]]
    assert not [row["name"] for row in framed if not row["calls"]], "a frame without a call: registers spilled"
    assert not [
        (row["name"], row["stack_bytes"])
        for row in framed
        if row["stack_bytes"] > cuda_machine_code.call_frame_budget(row)
    ]


def test_headline_kernels_have_no_stack_frame(table):
    headline = [row for row in table if cuda_machine_code.is_headline(row)]
    # per architecture: QFL rows in 3 dtypes x (labels, dense of pred's dtype, dense float32 for
    # the half types), DFL and the integral in 3 dtypes each
    assert len(headline) >= 14
    assert not [row["name"] for row in headline if row["stack_bytes"]]


def test_every_kernel_fits_the_register_budget(table):
    assert not [
        (row["name"], row["registers"]) for row in table if row["registers"] > cuda_machine_code.REGISTER_BUDGET
    ]


def test_committed_table_lists_the_kernels_of_this_build(table):
    committed = json.loads(cuda_machine_code.DEFAULT_TABLE.read_text())["kernels"]
    built_archs = {row["arch"] for row in table}
    listed = sorted((row["arch"], row["name"]) for row in committed if row["arch"] in built_archs)
    assert listed == sorted((row["arch"], row["name"]) for row in table), "run python -m tools.cuda_machine_code"
