"""The CUDA kernels' machine code, read from the built extension without a GPU.

cuobjdump (bundled with Triton) lists every kernel in gfl_ops._C: for each architecture
built, its registers, stack frame, local and shared memory, and the widths of its global
loads and stores in SASS. Each kernel's demangled name gives its variant (operator family,
exponent closed form, activated, gradient, element I/O, vector width, dtypes, target form).

    python -m tools.cuda_machine_code [--json PATH]     # the table, regenerated

writes benchmarks/results/machine-code/cuda.json by default, from a build with
TORCH_CUDA_ARCH_LIST=9.0 (the CI build). tests/cuda/test_cuda_machine_code.py checks every
kernel against the budgets below.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from tools import cubin

DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "machine-code" / "cuda.json"

# Every kernel is launched with 256 threads (gfl_kernels.cuh's kThreads, its launch bounds).
# The register budget: two blocks resident per SM, so that one block's loads are in flight
# while the other computes and reduces (the Triton kernels' rule, tools/triton_machine_code.py):
# 65,536 registers / (2 x 256 threads) = 128 a thread. Launch bounds of 256 threads alone
# would allow 255.
THREADS = 256
REGISTERS_PER_SM = 65536
MIN_RESIDENT_BLOCKS = 2
REGISTER_BUDGET = REGISTERS_PER_SM // (MIN_RESIDENT_BLOCKS * THREADS)
# A stack frame is allowed only in a kernel that calls a subroutine (the slow paths of IEEE
# division and of pow, taken for rare operands): the values live across the call. A frame
# in a kernel without calls would be registers spilled for want of room. A general exponent
# (no closed form) calls up to three library functions an element (pow below |m| = 1/2, exp
# and log1p above: gfl_math.h's power_of_magnitude), with more live across them: up to 64
# bytes there (the float64 variants and the 16-bit probability ones), 32 elsewhere.
MAX_CALL_FRAME_BYTES = 32
MAX_GENERAL_EXPONENT_CALL_FRAME_BYTES = 64


def call_frame_budget(row: dict) -> int:
    """The largest call frame allowed to a kernel of the table."""
    return MAX_GENERAL_EXPONENT_CALL_FRAME_BYTES if row.get("exponent") == "general" else MAX_CALL_FRAME_BYTES


_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
_MODULATIONS = ("quality", "focal_family")  # gfl_math.h's Modulation
_EXPONENTS = ("0", "1", "1.5", "2", "general")  # gfl_math.h's Exponent
_CLASS = re.compile(
    r"gfl::cuda::(class_rows_kernel|class_thread_per_anchor_kernel)<gfl::math::ClassVariant<"
    r"\(gfl::math::Modulation\)(\d), \(gfl::math::Exponent\)(\d), (true|false), (true|false), (true|false)>, "
    r"(?:(\d+), )?([\w:]+), ([\w:]+), gfl::math::(LabelTarget|DenseTarget)<([\w:]+), ([\w:]+)> >"
)
_BINS = re.compile(r"gfl::cuda::(dfl_kernel|integral_kernel)<([\w:]+), ([\w:]+)>")
_SUM = re.compile(r"gfl::cuda::(sum_kernel)<([\w:]+)>")


def library_path() -> str:
    from gfl_ops import _C

    return _C.__file__


def demangle(names: Sequence[str]) -> List[str]:
    """c++filt of each name (the names as they are where c++filt is missing)."""
    if shutil.which("c++filt") is None:
        return list(names)
    output = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return output.splitlines()


def variant(demangled: str) -> Dict[str, object]:
    """The template arguments of one gfl_ops kernel, named; {"kernel": name} for others."""
    match = _CLASS.search(demangled)
    if match:
        (
            kernel,
            modulation,
            exponent,
            activated,
            need_grad,
            element_io,
            vector,
            scalar,
            accumulate,
            target_form,
            target_first,
            target_second,
        ) = match.groups()
        if target_form == "LabelTarget":
            target = "labels+scores" if target_second == "true" else "labels"
        else:
            target = "dense " + _DTYPES[target_first]
        return dict(
            kernel=kernel,
            modulation=_MODULATIONS[int(modulation)],
            exponent=_EXPONENTS[int(exponent)],
            activated=activated == "true",
            need_grad=need_grad == "true",
            element_io=element_io == "true",
            vector=int(vector or 1),
            dtype=_DTYPES[scalar],
            accumulate=_DTYPES[accumulate],
            target=target,
        )
    match = _BINS.search(demangled)
    if match:
        return dict(kernel=match.group(1), dtype=_DTYPES[match.group(2)], accumulate=_DTYPES[match.group(3)])
    match = _SUM.search(demangled)
    if match:
        return dict(kernel=match.group(1), accumulate=_DTYPES[match.group(2)])
    return dict(kernel=demangled.split("(")[0])


def table(path: Optional[str] = None) -> List[dict]:
    """One row per kernel and architecture of the library at `path` (gfl_ops._C)."""
    path = path or library_path()
    resources = cubin.library_resources(path)
    sass = cubin.library_sass(path)
    keys = sorted(resources)
    rows = []
    for (arch, name), demangled in zip(keys, demangle([name for _, name in keys])):
        code = sass.get((arch, name), "")
        row = dict(arch=arch, name=name, **variant(demangled), **resources[(arch, name)])
        row.update(cubin.access_widths(code), calls=" CALL." in code)
        rows.append(row)
    return rows


def is_headline(row: dict) -> bool:
    """The kernels of the benchmark's headline cases: QFL (beta = 2, logits) on aligned rows
    with the gradient, and DFL and the integral, in float32, bfloat16 and float16."""
    if row["kernel"] in ("dfl_kernel", "integral_kernel"):
        return row["dtype"] != "float64"
    return (
        row["kernel"] == "class_rows_kernel"
        and row["modulation"] == "quality"
        and row["exponent"] == "2"
        and row["vector"] > 1
        and row["need_grad"]
        and not row["activated"]
        and row["dtype"] != "float64"
    )


def write(rows: List[dict], path: Path) -> None:
    """The table as JSON, one kernel a line (a rebuild's diff reads kernel by kernel)."""
    header = dict(
        torch=torch.__version__,
        threads=THREADS,
        register_budget=REGISTER_BUDGET,
        max_call_frame_bytes=MAX_CALL_FRAME_BYTES,
    )
    fields = ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in header.items())
    kernels = ",\n".join(json.dumps(row, sort_keys=True) for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{" + fields + ', "kernels": [\n' + kernels + "\n]}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cuda_machine_code", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--library", default=None, help="the library to read (default: gfl_ops._C)")
    args = parser.parse_args(argv)
    rows = table(args.library)
    write(rows, args.json)
    for row in rows:
        if is_headline(row):
            print(
                f"{row['arch']} {row['kernel']:18s} {row.get('dtype', ''):9s} {row.get('target', ''):15s} "
                f"{row['registers']:3d} regs  {row['stack_bytes']:3d} B stack  loads {row['loads']}  "
                f"stores {row['stores']}"
            )
    framed = sum(1 for row in rows if row["stack_bytes"])
    print(
        f"{len(rows)} kernels x architectures written to {args.json}; {framed} with a stack frame, "
        f"at most {max(row['registers'] for row in rows)} registers"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
