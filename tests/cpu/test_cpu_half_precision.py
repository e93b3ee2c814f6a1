"""float16 and bfloat16 pred on CPU: the kernels' conversions.

The CPU kernels read and write 16-bit elements through gfl_math.h's conversions on the
16-bit patterns (c10's own conversions are scalar code, which kept the kernels' loops from
vectorising). Checked here:

- the conversions bit for bit against torch: every float16 and bfloat16 pattern to float,
  and floats around every rounding boundary (ties, subnormals, overflow, inf, NaN) back,
  built into a small program with the kernels' compiler flags, vectorised, once per x86-64
  level this CPU runs (the kernels are compiled for each: GCC target_clones);
- the kernels' 16-bit results: the float32 kernels' on the widened input, rounded by torch.

Their speed (a 16-bit step within 1.5x of the float32 step) is the benchmark's to judge:
`python -m gfl_ops bench --half`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gfl_ops  # noqa: F401  (registers the operators)
from _helpers import HALF_DTYPES, dtype_id, make_generator

CSRC = Path(__file__).resolve().parents[2] / "csrc"
OPS = torch.ops.gfl_ops

# ---------------------------------------------------------------------------------------
# The conversions, in a program of their own
# ---------------------------------------------------------------------------------------

PROGRAM = r"""
#include "gfl_math.h"

#include <cstdio>
#include <cstring>
#include <vector>

using gfl::math::bfloat16_bits_to_float;
using gfl::math::float_to_bfloat16_bits;
using gfl::math::float_to_half_bits;
using gfl::math::half_bits_to_float;

// argv[1]: the conversion; argv[2], argv[3]: the raw input and output files.
template <typename In, typename Out, typename Convert>
int run(const char* in_path, const char* out_path, Convert convert) {
  std::FILE* in = std::fopen(in_path, "rb");
  std::vector<In> input;
  In value;
  while (std::fread(&value, sizeof(value), 1, in) == 1) input.push_back(value);
  std::fclose(in);
  std::vector<Out> output(input.size());
  const long count = static_cast<long>(input.size());
  const In* source = input.data();
  Out* destination = output.data();
#pragma omp simd
  for (long i = 0; i < count; ++i) {
    destination[i] = convert(source[i]);
  }
  std::FILE* out = std::fopen(out_path, "wb");
  std::fwrite(output.data(), sizeof(Out), output.size(), out);
  return std::fclose(out);
}

int main(int argc, char** argv) {
  const char* op = argv[1];
  if (!std::strcmp(op, "half_to_float"))
    return run<uint16_t, float>(argv[2], argv[3], [](uint16_t b) { return half_bits_to_float(b); });
  if (!std::strcmp(op, "bfloat16_to_float"))
    return run<uint16_t, float>(argv[2], argv[3], [](uint16_t b) { return bfloat16_bits_to_float(b); });
  if (!std::strcmp(op, "float_to_half"))
    return run<float, uint16_t>(argv[2], argv[3], [](float f) { return float_to_half_bits(f); });
  if (!std::strcmp(op, "float_to_bfloat16"))
    return run<float, uint16_t>(argv[2], argv[3], [](float f) { return float_to_bfloat16_bits(f); });
  return 2;
}
"""

# The flags of setup.py's CPU build, then the x86-64 levels the kernels are cloned for.
FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
X86_LEVELS = {
    "x86-64": set(),
    "x86-64-v3": {"avx2", "fma", "f16c", "bmi2"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
}


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="module", params=list(X86_LEVELS))
def conversions(request, tmp_path_factory):
    """Runs a conversion of the header over a numpy array: convert(name, array) -> array."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build the conversions")
    level = request.param
    is_x86 = os.uname().machine in ("x86_64", "AMD64")
    if not is_x86 and level != "x86-64":
        pytest.skip("x86-64 levels on an x86-64 machine only")
    if not X86_LEVELS[level] <= _cpu_flags() and is_x86:
        pytest.skip(f"this CPU does not run {level} code")
    folder = tmp_path_factory.mktemp(f"conversions-{level}")
    source = folder / "conversions.cpp"
    source.write_text(PROGRAM)
    program = folder / "conversions"
    march = [f"-march={level}"] if is_x86 else []
    subprocess.run([compiler, *FLAGS, *march, f"-I{CSRC}", str(source), "-o", str(program)], check=True)

    def convert(name: str, values: np.ndarray, out_dtype) -> np.ndarray:
        values.tofile(folder / "in.bin")
        subprocess.run([str(program), name, str(folder / "in.bin"), str(folder / "out.bin")], check=True)
        return np.fromfile(folder / "out.bin", dtype=out_dtype)

    return convert


NAMES = {torch.float16: "half", torch.bfloat16: "bfloat16"}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_every_16_bit_pattern_to_float(conversions, dtype):
    """Bit for bit as torch's .to(float32), NaN payloads included (c10's conversion quiets a
    signalling NaN, as F16C does)."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    expected = patterns.view(dtype).to(torch.float32).view(torch.int32).numpy()
    actual = conversions(f"{NAMES[dtype]}_to_float", patterns.numpy().view(np.uint16), np.uint32).view(np.int32)
    wrong = np.nonzero(actual != expected)[0]
    assert wrong.size == 0, [(hex(int(p) & 0xFFFF), hex(int(actual[p]) & 0xFFFFFFFF)) for p in wrong[:8]]


def _boundary_floats(dtype: torch.dtype) -> torch.Tensor:
    """Float bit patterns around every rounding boundary of dtype, both signs: every value of
    dtype, the float halfway to the next one (a tie, to even or away) and a unit either side
    of both; float subnormals, the largest floats and inf (overflow); quiet and signalling
    NaNs with payloads; and a million random patterns."""
    dropped = 13 if dtype == torch.float16 else 16  # float mantissa bits the format drops
    widened = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = widened[torch.isfinite(widened)].abs().unique()
    base = finite.view(torch.int32).long()
    ties = base + (1 << (dropped - 1))
    if dtype == torch.float16:
        # Subnormal halves (below 2^-14) sit 2^-24 apart, not 2^13 float units.
        subnormal = finite < 2.0**-14
        ties = torch.where(subnormal, (finite + 2.0**-25).view(torch.int32).long(), ties)
    around = torch.cat([base, ties - 1, ties, ties + 1, base - 1, base + 1])
    special = torch.tensor(
        [
            0x00000001,
            0x00000FFF,
            0x007FFFFF,
            0x00800000,
            0x33000000,
            0x33000001,
            0x387FE000,
            0x387FF000,
            0x477FE000,
            0x477FEFFF,
            0x477FF000,
            0x477FF001,
            0x47800000,
            0x7F7F7FFF,
            0x7F7F8000,
            0x7F7FFFFF,
            0x7F800000,
            0x7F800001,
            0x7F802000,
            0x7FA00000,
            0x7FC00000,
            0x7FC00001,
            0x7FFFFFFF,
        ],
        dtype=torch.long,
    )
    gen = make_generator("random-floats", dtype)
    random = torch.randint(0, 2**31, (1 << 20,), generator=gen, dtype=torch.long)
    magnitudes = torch.cat([around, special, random]).clamp(0, 0x7FFFFFFF)
    signed = torch.cat([magnitudes, magnitudes | (1 << 31)])
    return (signed - ((signed >> 31) << 32)).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_floats_to_16_bits(conversions, dtype):
    """Bit for bit: torch's .to() for every number; c10's scalar conversion (what the kernels
    wrote before, and torch.full writes) for NaN: 0x7E00 with the sign for float16, 0x7FC0 for
    bfloat16 (torch's vectorised .to() keeps a NaN's payload instead)."""
    floats = _boundary_floats(dtype)
    actual = torch.from_numpy(conversions(f"float_to_{NAMES[dtype]}", floats.numpy(), np.uint16).view(np.int16))
    nan = floats.isnan()
    expected = floats.to(dtype).view(torch.int16)
    for negative in (False, True):
        c10_nan = torch.full((), math.copysign(math.nan, -1.0 if negative else 1.0), dtype=dtype)
        expected[nan & ((floats.view(torch.int32) < 0) == negative)] = c10_nan.view(torch.int16)
    wrong = torch.nonzero(actual != expected).flatten()
    assert wrong.numel() == 0, [
        (
            hex(int(floats.view(torch.int32)[i]) & 0xFFFFFFFF),
            hex(int(actual[i]) & 0xFFFF),
            hex(int(expected[i]) & 0xFFFF),
        )
        for i in wrong[:8]
    ]
    # The cases are there: ties both ways, subnormal results, overflow to inf, NaN.
    assert nan.sum() >= 8 and floats.isinf().sum() >= 2
    assert (floats.to(dtype).isinf() & floats.isfinite()).any()


# ---------------------------------------------------------------------------------------
# The kernels' 16-bit results: the float32 results, rounded
# ---------------------------------------------------------------------------------------


def _qfl_calls(dtype, gen):
    """(name, pred, fn(pred, compute_grad) -> (loss, grad)) over the CPU walks of QFL: rows
    of (N, C), class planes of (B, C, H, W), and a dense target in pred's dtype."""
    rows = torch.randn(67, 80, generator=gen).to(dtype)
    planes = torch.randn(2, 80, 9, 11, generator=gen).to(dtype)
    label = torch.randint(0, 81, (67,), generator=gen)
    plane_label = torch.randint(-1, 80, (2, 9, 11), generator=gen)
    score = torch.rand(67, generator=gen)
    plane_score = torch.rand(2, 9, 11, generator=gen)
    dense = (torch.rand(67, 80, generator=gen) * (torch.rand(67, 80, generator=gen) < 0.3)).to(dtype)
    return [
        (
            "qfl rows",
            rows,
            lambda p, g: OPS._quality_focal_loss_native(p, label, score, None, None, 2.0, False, "none", g),
        ),
        (
            "qfl planes",
            planes,
            lambda p, g: OPS._quality_focal_loss_native(p, plane_label, plane_score, None, None, 1.5, False, "none", g),
        ),
        (
            "qfl probabilities",
            rows.float().sigmoid().to(dtype),
            lambda p, g: OPS._quality_focal_loss_native(p, label, score, None, None, 2.0, True, "none", g),
        ),
        (
            "qfl dense",
            rows,
            lambda p, g: OPS._quality_focal_loss_dense_native(
                p, dense if p.dtype == dtype else dense.float(), None, None, 2.0, False, "none", g
            ),
        ),
    ]


def _bin_calls(dtype, gen):
    """DFL and the integral on 17 bins, in whole blocks of 16 rows (the block walk)."""
    pred = (3 * torch.randn(64, 17, generator=gen)).to(dtype)
    target = torch.rand(64, generator=gen) * 16
    return [
        ("dfl", pred, lambda p, g: OPS._distribution_focal_loss_native(p, target, None, "none", g)),
        ("integral", pred, lambda p, g: OPS._distribution_integral_native(p, None, g)),
    ]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_kernels_round_the_float32_results(dtype):
    """Per-element results, the gradient and the integral's value, of a 16-bit pred are the
    float32 kernel's on the same (widened, exact) values, rounded by torch's .to()."""
    gen = make_generator("round-the-float32-results", dtype)
    for name, pred, call in _qfl_calls(dtype, gen) + _bin_calls(dtype, gen):
        loss, grad = call(pred, True)
        loss32, grad32 = call(pred.float(), True)
        assert torch.equal(grad.view(torch.int16), grad32.to(dtype).view(torch.int16)), name
        if loss.dtype == dtype:  # the integral's value
            assert torch.equal(loss.view(torch.int16), loss32.to(dtype).view(torch.int16)), name
        else:
            torch.testing.assert_close(loss, loss32, rtol=2e-6, atol=1e-6, msg=name)
