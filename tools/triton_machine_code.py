"""The Triton kernels as a GPU would run them, built here without one.

Each launch case below calls a Triton kernel of gfl_ops.triton.ops on CPU tensors with
its kernels replaced by recorders: the arguments and constexprs of the exact launch that a
GPU run of that case makes are captured, specialised by Triton's own JIT binder (pointer
alignment, integers equal to 1 or divisible by 16, as on a GPU), and compiled by the real
Triton compiler for sm_80 and sm_90. cuobjdump (bundled with Triton) then reads each cubin:
registers, local memory (spills), shared memory, and the widths of the global loads and
stores in its SASS.

    python -m tools.triton_machine_code [--json PATH] # the table, regenerated

writes benchmarks/results/machine-code/triton.json by default. tests/triton/test_triton_machine_code.py
checks every variant against the budgets below.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from tools import cubin as cubin_tools
from gfl_ops import _registry
from gfl_ops.triton import kernels, ops

ARCHITECTURES = (80, 90)
KERNEL_NAMES = ("class_kernel", "dfl_kernel", "integral_kernel")
# The Triton kernel of each operator, as torch.ops.gfl_ops._<operator>_triton runs it.
TRITON_KERNELS = {name: ops.kernel(operator) for name, operator in _registry.OPERATORS.items()}
DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "machine-code" / "triton.json"

# The register budget. An SM holds 65,536 32-bit registers, 2,048 threads and 32 programs
# (thread blocks). A variant must let at least two of its programs be resident on an SM:
# then one program's loads are in flight while another computes, reduces and stores (one
# resident program would leave the memory system idle in its tail). Registers x threads x 2
# <= 65,536: 255 registers for the 128 threads of a 2048-element tile, 128 for 256 threads.
# The table also records the bytes of pred each SM has in flight (resident programs x the
# tile's pred bytes) against the ~23 KB that Little's law asks at an H200's 4.3 TB/s
# (x ~700 ns of DRAM latency / 132 SMs): informational, a GPU run decides.
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
PROGRAMS_PER_SM = 32
MIN_RESIDENT_PROGRAMS = 2
LITTLES_LAW_BYTES_PER_SM = 23 * 1024


def resident_programs(registers: int, threads: int) -> int:
    """Programs of `threads` threads an SM holds at `registers` a thread (register file,
    thread and program limits; the register file's allocation granularity is ignored)."""
    return min(REGISTERS_PER_SM // max(1, registers * threads), THREADS_PER_SM // threads, PROGRAMS_PER_SM)


@dataclasses.dataclass(frozen=True)
class LaunchCase:
    """One call of a Triton operator: the name of the variant and how to make the call."""

    name: str
    call: Callable[[], None]


def _class_pred(layout: str, dtype: torch.dtype, classes: int = 80) -> torch.Tensor:
    if layout == "rows":
        return torch.randn(1024, classes).to(dtype)
    if layout == "planes":  # (B, C, H, W), channel-first
        return torch.randn(2, classes, 16, 32).to(dtype)
    if layout == "channels_last":
        return torch.randn(2, 16, 32, classes).to(dtype).permute(0, 3, 1, 2)
    raise ValueError(layout)


def _anchor_shape(pred: torch.Tensor) -> tuple:
    return (pred.shape[0],) + tuple(pred.shape[2:])


def _class_call(
    op: str,
    dtype: torch.dtype,
    layout: str = "rows",
    exponent: float = 2.0,
    activated: bool = False,
    weight: str = "none",
    class_weight: bool = False,
    reduction: str = "sum",
    need_grad: bool = True,
    dense: bool = False,
) -> Callable[[], None]:
    def call() -> None:
        pred = _class_pred(layout, dtype)
        if activated:
            pred = pred.float().sigmoid().to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        anchors = _anchor_shape(pred)
        label = torch.randint(0, 100, anchors)
        score = torch.rand(anchors, dtype=acc)
        target = torch.rand(pred.shape, dtype=acc) if dense else None
        anchor_weight = torch.rand(anchors, dtype=acc) if weight == "anchor" else None
        if weight == "element":
            anchor_weight = torch.rand(pred.shape, dtype=acc)
        weights = torch.rand(pred.shape[1], dtype=acc) if class_weight else None
        if op == "quality_focal_loss":
            TRITON_KERNELS["quality_focal_loss"](
                pred, label, score, anchor_weight, weights, exponent, activated, reduction, need_grad
            )
        elif op == "quality_focal_loss_dense":
            TRITON_KERNELS["quality_focal_loss_dense"](
                pred, target, anchor_weight, weights, exponent, activated, reduction, need_grad
            )
        elif op == "sigmoid_focal_loss":
            TRITON_KERNELS["sigmoid_focal_loss"](
                pred,
                target if dense else label,
                anchor_weight,
                weights,
                0.25,
                exponent,
                activated,
                reduction,
                need_grad,
            )
        else:
            TRITON_KERNELS["varifocal_loss"](
                pred,
                target if dense else label,
                None if dense else score,
                anchor_weight,
                weights,
                0.75,
                exponent,
                True,
                False,
                activated,
                reduction,
                need_grad,
            )

    return call


def _bin_call(
    op: str,
    dtype: torch.dtype,
    bins: int = 17,
    strided: bool = False,
    weight: bool = False,
    reduction: str = "sum",
    need_grad: bool = True,
) -> Callable[[], None]:
    def call() -> None:
        rows = torch.randn(2048 * (2 if strided else 1), bins).to(dtype)
        pred = rows[::2] if strided else rows
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if op == "distribution_focal_loss":
            target = torch.rand(pred.shape[0], dtype=acc) * (bins - 1)
            row_weight = torch.rand(pred.shape[0], dtype=acc) if weight else None
            TRITON_KERNELS["distribution_focal_loss"](pred, target, row_weight, reduction, need_grad)
        else:
            scale = torch.rand(pred.shape[0], dtype=acc) if weight else None
            TRITON_KERNELS["distribution_integral"](pred, scale, need_grad)

    return call


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
CLASS_OPS = {  # name: (operator, dense target)
    "qfl": ("quality_focal_loss", False),
    "qfl_dense": ("quality_focal_loss_dense", True),
    "focal": ("sigmoid_focal_loss", False),
    "focal_dense": ("sigmoid_focal_loss", True),
    "varifocal": ("varifocal_loss", False),
    "varifocal_dense": ("varifocal_loss", True),
}
# One switch at a time away from each classification op's training configuration (float32
# rows, exponent 2, logits, no weights, "sum", with the gradient).
CLASS_VARIATIONS = {
    "planes": dict(layout="planes"),
    "channels_last": dict(layout="channels_last"),
    "exponent0": dict(exponent=0.0),
    "exponent1": dict(exponent=1.0),
    "exponent1.5": dict(exponent=1.5),
    "exponent2.5": dict(exponent=2.5),
    "activated": dict(activated=True),
    "anchor_weight": dict(weight="anchor"),
    "class_weight": dict(class_weight=True),
    "none": dict(reduction="none"),
    "no_grad": dict(need_grad=False),
}
ELEMENTWISE_VARIATIONS = {"element_weight": dict(weight="element")}  # focal, varifocal only


def launch_cases() -> List[LaunchCase]:
    """The table's cases: every op in every dtype in its training configuration, and each
    switch of the launch (layout, exponent, probabilities, weights, reduction, gradient)
    flipped alone in float32, then DFL and the integral (17 and 16 bins, strided rows,
    weights, no gradient)."""
    cases = []
    for name, (op, dense) in CLASS_OPS.items():
        for dtype_name, dtype in DTYPES.items():
            cases.append(LaunchCase(f"{name} {dtype_name}", _class_call(op, dtype, dense=dense)))
        variations = dict(CLASS_VARIATIONS)
        if op in ("sigmoid_focal_loss", "varifocal_loss"):
            variations.update(ELEMENTWISE_VARIATIONS)
        for variation, options in variations.items():
            cases.append(LaunchCase(f"{name} fp32 {variation}", _class_call(op, torch.float32, dense=dense, **options)))
    for name, op in (("dfl", "distribution_focal_loss"), ("integral", "distribution_integral")):
        for dtype_name, dtype in DTYPES.items():
            cases.append(LaunchCase(f"{name} {dtype_name}", _bin_call(op, dtype)))
        for variation, options in {
            "16_bins": dict(bins=16),
            "strided": dict(strided=True),
            "weighted": dict(weight=True),
            "no_grad": dict(need_grad=False),
        }.items():
            cases.append(LaunchCase(f"{name} fp32 {variation}", _bin_call(op, torch.float32, **options)))
    return cases


@dataclasses.dataclass
class _Launch:
    kernel: triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, kernel, launches: List[_Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(_Launch(self.kernel, args, kwargs))


def capture(case: LaunchCase) -> List[_Launch]:
    """The kernel launches the case's call makes (on CPU tensors: nothing runs)."""
    launches: List[_Launch] = []
    originals = {name: getattr(kernels, name) for name in KERNEL_NAMES}
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, _Recorder(kernel, launches))
        case.call()
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    return launches


def specialise(launch: _Launch, arch: int):
    """Triton's JIT specialisation of the launch for a CUDA target of `arch`: (source,
    options), what a GPU run would compile."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def variant_key(launch: _Launch) -> str:
    """What makes two launches compile to the same kernel: its name, argument types (the
    pointers' element types), constexprs, alignment and integer specialisations, and
    options (sm_90's, which differ from sm_80's only in the target)."""
    source, _, options = specialise(launch, ARCHITECTURES[-1])
    names = launch.kernel.arg_names

    def named(path: tuple) -> str:
        return names[path[0]] + "".join(f"[{index}]" for index in path[1:])

    constexprs = {named(path): str(value) for path, value in source.constants.items()}
    attrs = {named(path): value for path, value in source.attrs.items() if value}
    types = {name: str(value) for name, value in source.signature.items() if value != "constexpr"}
    return json.dumps([launch.kernel.__name__, constexprs, attrs, options["num_warps"], types], sort_keys=True)


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack (spill) and local bytes, shared bytes and global access widths."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        (usage,) = cubin_tools.resources(path).values()
        (sass,) = cubin_tools.sass_by_kernel(path).values()
    return dict(usage, **cubin_tools.access_widths(sass))


def compile_variant(launch: _Launch, arch: int) -> dict:
    source, target, options = specialise(launch, arch)
    compiled = triton.compile(source, target=target, options=options)
    row = inspect_cubin(compiled.asm["cubin"])
    threads = 32 * options["num_warps"]
    resident = resident_programs(row["registers"], threads)
    row.update(
        arch=f"sm_{arch}",
        threads=threads,
        resident_programs=resident,
        pred_bytes_in_flight_per_sm=resident * _tile_pred_bytes(launch),
    )
    return row


def _tile_pred_bytes(launch: _Launch) -> int:
    """The bytes of pred one program reads: its tile (BLOCK_ANCHORS x BLOCK_CLASSES or
    BLOCK_ROWS x BLOCK_BINS elements, padding included) times pred's element size."""
    constants = launch.kwargs
    tile = (
        constants["BLOCK_ANCHORS"] * constants["BLOCK_CLASSES"]
        if "BLOCK_ANCHORS" in constants
        else constants["BLOCK_ROWS"] * constants["BLOCK_BINS"]
    )
    return tile * launch.args[0].element_size()


def variants() -> Dict[str, List[str]]:
    """Distinct variants: key -> the names of the cases that launch it."""
    found: Dict[str, List[str]] = {}
    for case in launch_cases():
        for launch in capture(case):
            found.setdefault(variant_key(launch), []).append(case.name)
    return found


def compile_rows(key: str, case_names: List[str]) -> List[dict]:
    """The variant of `key` (launched by the first of case_names) for every architecture."""
    case = next(case for case in launch_cases() if case.name == case_names[0])
    launch = next(launch for launch in capture(case) if variant_key(launch) == key)
    rows = []
    for arch in ARCHITECTURES:
        row = dict(kernel=launch.kernel.__name__, cases=case_names, constexprs=json.loads(key)[1])
        row.update(compile_variant(launch, arch))
        rows.append(row)
    return rows


def table(workers: Optional[int] = None) -> List[dict]:
    """Every variant compiled for every architecture, one row each, in processes of their
    own (the compiler holds the GIL)."""
    found = sorted(variants().items(), key=lambda item: item[1][0])
    workers = workers or min(4, os.cpu_count() or 1)
    # spawn, not fork: a forked child of a process with torch's and Triton's threads can hang
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return [row for rows in pool.map(compile_rows, *zip(*found)) for row in rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.triton_machine_code", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_TABLE)
    args = parser.parse_args(argv)
    rows = table()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = dict(
        triton=triton.__version__,
        torch=torch.__version__,
        min_resident_programs=MIN_RESIDENT_PROGRAMS,
        littles_law_bytes_per_sm=LITTLES_LAW_BYTES_PER_SM,
        variants=rows,
    )
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['kernel']:16s} {row['arch']}  {row['registers']:3d} regs  {row['resident_programs']:2d} resident  "
            f"{row['local_bytes']:4d} B local  {row['shared_bytes']:5d} B shared  loads {row['loads']}  "
            f"stores {row['stores']}  {row['cases'][0]}"
        )
    print(f"{len(rows)} variants x architectures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
