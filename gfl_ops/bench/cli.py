"""python -m gfl_ops bench: the options, the plan they make (cases and settings), the run and
what it prints and writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .._command_line import device_argument, existing_file_argument, writable_file_argument
from .cases import DTYPES, LAYOUTS, MODES, Case
from .ops import OPS, build_cases, dfl, qfl
from .providers import PROVIDERS, not_run
from .report import format_not_run, format_table, write_plot
from .results import default_results_path, environment, load_results, results_document
from .runner import Settings, run
from .targets import format_headlines

HALF_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    """ "44800x80,134400x80" -> [(44800, 80), (134400, 80)]."""
    shapes = []
    for item in text.split(","):
        try:
            rows, classes = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is ROWSxCLASSES, e.g. 44800x80; got {item!r}") from None
        if rows < 1 or classes < 1:
            raise argparse.ArgumentTypeError(f"a shape's sizes must be at least 1, got {item!r}")
        shapes.append((rows, classes))
    return shapes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gfl_ops bench",
        description="Benchmark gfl_ops against the eager reference, torch.compile and the eager code users run "
        "today (mmdetection, torchvision, ultralytics).",
        epilog="On CPU the default set skips QFL N=358400 and 537600, DFL 262144 rows, qfl_prob's channel-first "
        "layout and bfloat16 (pass --full / --dtype fp32 bf16). GPU runs write benchmarks/results/<device>.json "
        "unless --json is given; CPU runs write JSON only to --json. Explicit options override what "
        "--quick and --half choose.",
    )
    add = parser.add_argument
    add("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    add("--ops", nargs="+", choices=OPS, help="default: all (quick, half: qfl dfl)")
    add("--modes", nargs="+", choices=MODES, help="default: forward full (quick, half: full)")
    add(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        help="default: every available one (on CPU, triton only when named; half: native)",
    )
    add("--dtype", nargs="+", choices=sorted(DTYPES), help="default: fp32 (+ bf16 on CUDA; half: fp32 fp16 bf16)")
    add("--layouts", nargs="+", choices=LAYOUTS, help="QFL pred layouts (default: both; half: nc)")
    add("--quick", action="store_true", help="headline shapes (qfl, dfl), fp32, full mode, one warm-up")
    add(
        "--half",
        action="store_true",
        help="native in fp32, fp16 and bf16 at QFL 134400x80 and DFL 65536x17, "
        "full mode: each half-precision row's x fp32 against the half-precision target",
    )
    add("--full", action="store_true", help="every shape, also on CPU")
    add("--qfl-shapes", type=_parse_shapes, metavar="NxC,...", help="override the QFL shapes")
    add("--dfl-shapes", type=_parse_shapes, metavar="MxBINS,...", help="override the DFL/integral shapes")
    add("--repeats", type=int, help="timed rounds (default 10 on CUDA, 7 on CPU and with --quick)")
    add("--warmup", type=int, help="untimed steps per provider before timing (default 2, 1 with --quick)")
    add("--no-memory", action="store_true", help="skip the peak-memory step")
    add("--compile-backend", default="inductor", metavar="NAME", help="torch.compile backend of the compile provider")
    add("--json", type=writable_file_argument, metavar="PATH", help="write the results as JSON")
    add("--plot", type=writable_file_argument, metavar="PATH", help="write a PNG of native's speedups")
    add(
        "--from-json",
        type=existing_file_argument,
        metavar="PATH",
        help="run nothing: print the table and targets of a saved "
        "run (e.g. benchmarks/results/*.json), and its plot with --plot",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.quick and args.half:
        parser.error("--quick and --half choose different shapes: pass one of them")
    if args.from_json is not None and args.json is not None:
        parser.error("--from-json reads a saved run: it writes no --json")
    return args


def _preset(args: argparse.Namespace, device: torch.device, notes: List[str]) -> dict:
    """What --half, --quick or the device's default set ask for, before explicit options."""
    if args.half:
        return dict(
            ops=["qfl", "dfl"], modes=["full"], providers=["native"], layouts=["nc"], dtypes=list(HALF_PRECISION),
            qfl_shapes=list(qfl.HALF_SHAPES), dfl_shapes=list(dfl.HALF_SHAPES),
        )  # fmt: skip
    if device.type == "cuda" and not args.quick and torch.cuda.is_bf16_supported():
        dtypes = [torch.float32, torch.bfloat16]
    else:
        dtypes = [torch.float32]
        if device.type == "cpu" and not args.quick:
            notes.append("bfloat16 skipped on CPU (--dtype fp32 bf16 to add it; --half for the half-precision target)")
    if args.quick:
        shapes = dict(qfl_shapes=list(qfl.QUICK_SHAPES), dfl_shapes=list(dfl.QUICK_SHAPES))
        return dict(ops=["qfl", "dfl"], modes=["full"], dtypes=dtypes, **shapes)
    qfl_shapes, dfl_shapes = list(qfl.SHAPES), list(dfl.SHAPES)
    if device.type == "cpu" and not args.full:
        qfl_shapes = [shape for shape in qfl_shapes if shape[0] not in qfl.CPU_SKIPPED_ANCHORS]
        dfl_shapes = [shape for shape in dfl_shapes if shape[0] not in dfl.CPU_SKIPPED_ROWS]
        notes.append(
            f"CPU default: QFL N={qfl.CPU_SKIPPED_ANCHORS}, DFL rows={dfl.CPU_SKIPPED_ROWS} and "
            "qfl_prob's channel-first layout skipped (--full to run them)"
        )
    return dict(ops=list(OPS), modes=list(MODES), dtypes=dtypes, qfl_shapes=qfl_shapes, dfl_shapes=dfl_shapes)


def plan(args: argparse.Namespace) -> Tuple[List[Case], Settings, List[str]]:
    """The cases and settings the arguments ask for, and notes on what the defaults left out
    and on each provider that will not run, with why."""
    device = torch.device(args.device)
    notes: List[str] = []
    preset = _preset(args, device, notes)
    on_cpu = device.type == "cpu"
    cases = build_cases(
        args.ops or preset["ops"],
        [DTYPES[name] for name in args.dtype] if args.dtype else preset["dtypes"],
        args.qfl_shapes or preset["qfl_shapes"],
        args.dfl_shapes or preset["dfl_shapes"],
        args.layouts or preset.get("layouts", LAYOUTS),
        ("qfl", "focal") if on_cpu and not args.full else ("qfl", "qfl_prob", "focal"),
    )
    settings = Settings(
        device=device,
        modes=args.modes or preset["modes"],
        providers=args.providers or preset.get("providers"),
        repeats=args.repeats or (7 if args.quick or on_cpu else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        measure_memory=not args.no_memory,
        compile_backend=args.compile_backend,
    )
    notes += format_not_run(not_run(_ops_of(cases), device, settings.providers))
    return cases, settings, notes


def _ops_of(cases: Sequence[Case]) -> List[str]:
    return list(dict.fromkeys(case.op for case in cases))


def _print_report(rows: List[dict], device_type: str) -> None:
    print(format_table(rows))
    headlines = format_headlines(rows, device_type)
    if headlines:
        print()
        print(headlines)


def _report_saved(args: argparse.Namespace) -> int:
    """--from-json: a saved run's table, targets and (with --plot) plot."""
    document = load_results(args.from_json)
    device, versions = document.get("device", {}), document.get("versions", {})
    print(
        f"{args.from_json}: {device.get('name')} ({device.get('type')}, {device.get('threads')} threads), "
        f"torch {versions.get('torch')}, {document.get('date')}, commit {document.get('git_commit')}"
    )
    for note in list(document["notes"]) or format_not_run(document["not_run"]):
        print("note: " + note)
    print()
    _print_report(document["rows"], device.get("type", "cpu"))
    if args.plot is not None:
        print(write_plot(document["rows"], args.plot))
    return 0


def _busy_note(settings: Settings, env: dict) -> List[str]:
    load = env["load_average"]
    if settings.device.type != "cpu" or not load or load[0] <= 0.5:
        return []
    return [
        f"the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} cores): "
        "CPU timings will be noisy; providers take turns, so ratios suffer less than times"
    ]


def _write_json(document: dict, path: Optional[Path], device: torch.device) -> None:
    if path is None and device.type == "cuda":
        path = default_results_path(device)
    if path is None:
        print("no JSON written (CPU run): pass --json PATH to keep the numbers")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"results written to {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json is not None:
        return _report_saved(args)
    cases, settings, notes = plan(args)
    env = environment(settings.device)
    print(
        f"gfl_ops bench on {env['device']['name']} ({settings.device.type}, {env['device']['threads']} threads), "
        f"torch {env['versions']['torch']}, {len(cases)} cases x modes {list(settings.modes)}, "
        f"{settings.repeats} repeats after {settings.warmup} warm-up",
        flush=True,
    )
    notes += _busy_note(settings, env)
    for note in notes:
        print("note: " + note, flush=True)
    started = time.perf_counter()
    rows = run(cases, settings)
    print()
    _print_report(rows, settings.device.type)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s")
    skipped = not_run(_ops_of(cases), settings.device, settings.providers)
    _write_json(results_document(rows, settings, argv, env, skipped, notes), args.json, settings.device)
    if args.plot is not None:
        print(write_plot(rows, args.plot))
    failed = sum(row.get("error") is not None for row in rows)
    if failed:
        print(f"{failed} of {len(rows)} rows failed (their error is in the table)")
    return 1 if failed else 0
