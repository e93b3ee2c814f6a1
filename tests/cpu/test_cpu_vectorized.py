"""The CPU kernels' class loops are vectorised: read from the built extension's machine code.

The classification kernels are fast on the CPU only because GCC vectorises their class
loops (the element maths of csrc/gfl_math.h is written branch-free for it). A change to
the maths can silently turn a loop scalar: the focal family's weight once read bool
switches in the loop, and its kernels ran 10x slower than QFL's with the same results. No
timing here (machines are shared and noisy): the AVX2 clone of each hot walk must hold
packed single-precision arithmetic on 256-bit registers, as its QFL twin does.
"""

import platform
import re
import shutil
import subprocess

import pytest

import gfl_ops

TOOLS = ("nm", "objdump")

# (walk, modulation, exponent, target): walks of csrc/cpu/gfl_kernels_cpu.h for float32
# pred, with and without the gradient. Modulation 0: QFL, 1: the focal family; exponent
# (gfl_math.h's Exponent) 3: 2, 2: 1.5, 0: 0.
WALKS = [
    ("class_rows<true,", 0, 3, "gfl::math::DenseTarget<float, float>"),
    ("class_rows<true,", 1, 3, "gfl::math::DenseTarget<float, float>"),
    ("class_rows<true,", 0, 3, "gfl::math::LabelTarget<float, true>"),
    ("class_rows<true,", 1, 3, "gfl::math::LabelTarget<float, false>"),
    ("class_planes<", 0, 3, "gfl::math::LabelTarget<float, true>"),
    ("class_planes<", 1, 3, "gfl::math::LabelTarget<float, false>"),
    ("class_rows<true,", 0, 0, "gfl::math::DenseTarget<float, float>"),
    ("class_rows<true,", 1, 2, "gfl::math::LabelTarget<float, true>"),
]
# Packed single-precision arithmetic with a 256-bit operand (AT&T syntax: any operand order).
PACKED_AVX = re.compile(r"\bv(?:add|sub|mul|div|fn?m(?:add|sub)\d*|max|min)ps\b.*%ymm")


def _extension_path():
    if not gfl_ops._ops.native_loaded():
        pytest.skip(f"the extension is not built: {gfl_ops._ops.NATIVE_IMPORT_ERROR}")
    return gfl_ops._C.__file__


def _symbols(path):
    """{demangled name: (address, size)} of the extension's defined functions."""
    listing = subprocess.run(["nm", "-C", "-S", "--defined-only", path], capture_output=True, text=True, check=True)
    symbols = {}
    for line in listing.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2].lower() == "t":
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return symbols


@pytest.fixture(scope="module")
def extension():
    if platform.machine() != "x86_64":
        pytest.skip(f"the CPU kernels are cloned for x86-64 targets only, this is {platform.machine()}")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"binutils' {', '.join(missing)} not installed")
    path = _extension_path()
    symbols = _symbols(path)
    if not any("[clone .arch_x86_64_v3]" in name for name in symbols):
        pytest.skip("the extension was not built with GCC's target_clones (no AVX2 clones)")
    return path, symbols


def _packed_instructions(path, address, size):
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={address}", f"--stop-address={address + size}", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(1 for line in listing.stdout.splitlines() if PACKED_AVX.search(line))


@pytest.mark.parametrize("need_grad", ["true", "false"])
@pytest.mark.parametrize("walk,modulation,exponent,target", WALKS, ids=lambda value: str(value).strip("<,"))
def test_avx2_clone_of_each_class_walk_is_vectorised(extension, walk, modulation, exponent, target, need_grad):
    path, symbols = extension
    variant = (
        f"gfl::math::ClassVariant<(gfl::math::Modulation){modulation}, (gfl::math::Exponent){exponent}, false, "
        f"{need_grad}, false>"
    )
    found = [
        (name, location)
        for name, location in symbols.items()
        if walk in name
        and variant in name
        and f"float, float, {target} >" in name
        and "[clone .arch_x86_64_v3]" in name
    ]
    assert len(found) == 1, f"expected one AVX2 clone of {walk} {variant} {target}, found {[n for n, _ in found]}"
    name, (address, size) = found[0]
    packed = _packed_instructions(path, address, size)
    # The vectorised class loop of the exp/log1p maths alone is dozens of packed operations.
    assert packed >= 20, f"{name}: {packed} packed 256-bit float operations: the class loop is not vectorised"
