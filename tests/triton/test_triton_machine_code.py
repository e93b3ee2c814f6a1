"""The Triton kernels compiled by the real Triton compiler for sm_80 and sm_90, here without
a GPU (tools/triton_machine_code.py), and their machine code read back.

Every variant that the launch cases make (each op in each dtype, and each launch switch
flipped alone) must compile, spill nothing, let MIN_RESIDENT_PROGRAMS programs be
resident per SM (the register budget: see machine_code.py), and the QFL rows path for
aligned float32 and bfloat16 rows must load pred and store its gradient 128 bits at a
time. The committed table, benchmarks/results/machine-code/triton.json, must list the
variants of the current kernels (python -m tools.triton_machine_code regenerates it).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.machine_code
triton = pytest.importorskip("triton", reason="Triton is not installed")
from tools import triton_machine_code as machine_code  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return machine_code.table(workers=2)


def test_every_variant_compiles_for_each_architecture(table):
    variants = machine_code.variants()
    assert len(variants) > 50
    assert len(table) == len(variants) * len(machine_code.ARCHITECTURES)
    assert {row["arch"] for row in table} == {"sm_80", "sm_90"}
    assert {row["kernel"] for row in table} == set(machine_code.KERNEL_NAMES)


def test_no_variant_spills(table):
    """No stack frame (where ptxas puts spilled registers) and no local memory."""
    spilling = [
        (row["arch"], row["cases"][0], row["stack_bytes"], row["local_bytes"])
        for row in table
        if row["stack_bytes"] or row["local_bytes"]
    ]
    assert not spilling


def test_every_variant_fits_the_register_budget(table):
    """At least two programs of each variant resident per SM (registers x threads x 2 <= 65,536)."""
    over = [
        (row["arch"], row["cases"][0], row["registers"], row["threads"])
        for row in table
        if row["resident_programs"] < machine_code.MIN_RESIDENT_PROGRAMS
    ]
    assert not over


@pytest.mark.parametrize("case", ["qfl fp32", "qfl bf16"])
def test_aligned_qfl_rows_load_and_store_128_bits(table, case):
    rows = [row for row in table if case in row["cases"]]
    assert len(rows) == len(machine_code.ARCHITECTURES)
    for row in rows:
        assert row["loads"].get("128", 0) > 0, row  # pred, 4 floats (8 bfloat16) a load
        assert row["stores"].get("128", 0) > 0, row  # its gradient


def test_committed_table_lists_the_current_variants(table):
    committed = json.loads(machine_code.DEFAULT_TABLE.read_text())

    def listed(rows):
        return sorted((row["kernel"], row["arch"], tuple(row["cases"])) for row in rows)

    assert listed(committed["variants"]) == listed(table), "run python -m tools.triton_machine_code"
