"""python -m gfl_ops tune: the tuning table backend="auto" reads (gfl_ops/_tuning.py), derived
from benchmark results of one CUDA device.

How `tune` derives an entry from bench --json files of one CUDA device:

- backends: every case (op, shape, layout, dtype) that native and triton both ran in mode
  "full" (forward + backward) without error gives the ratio of their median_ms, native over
  triton, within one file. The geometric mean of the ratios of an operator and dtype (the
  bench ops qfl and qfl_prob both run quality_focal_loss) picks triton above 1, native
  otherwise.
- gradient_pass: the bench does not record the gradient pass it ran under, so the command
  is told: its RESULTS files ran under CUDA's default ("backward"), the files given to
  --gradient-in-forward ran with GFL_OPS_GRADIENT_PASS=forward. Each case native ran in
  mode "full" in both gives the ratio forward over backward; their geometric mean picks
  "backward" at 1 and above, "forward" below. float16 cases are left out: float16 pred
  always takes the backward pass.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .bench.cases import DTYPES
from .bench.ops import OP_SPECS
from ._tuning import DTYPE_NAMES, ENVIRONMENT_VARIABLE, PACKAGE_TABLE, read_table

CUDA_DEFAULT_GRADIENT_PASS = "backward"  # csrc/gfl_autograd.cpp, without GFL_OPS_GRADIENT_PASS
ROW_FIELDS = ("op", "mode", "shape_label", "layout", "dtype", "provider", "median_ms", "error")
# --------------------------------------------------------------------------------------
# Deriving the table from benchmark results
# --------------------------------------------------------------------------------------


class Results(NamedTuple):
    """One bench --json file, as the derivation reads it."""

    path: str
    device_name: str
    rows: List[dict]
    source: dict  # its record in the table: file, gradient pass, date, commit


def _bench_names(op: str, dtype: str) -> Tuple[str, str]:
    """(operator, dtype name) of a bench row's op and dtype ("qfl", "fp32" -> "quality_focal_loss", "float32")."""
    if op not in OP_SPECS:
        raise ValueError(f"unknown op {op!r} (ops: {tuple(OP_SPECS)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (dtypes: {tuple(DTYPES)})")
    return OP_SPECS[op].operator, DTYPE_NAMES[DTYPES[dtype]]


def _check_row(row: object, where: str) -> None:
    """A bench row with every field, a known op and dtype, and (when it ran without error) a
    median time that is a finite number above 0: the ratios divide by it and take its log."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {row!r}")
    missing = [field for field in ROW_FIELDS if field not in row]
    if missing:
        raise ValueError(f"{where}: lacks {missing}: {row}")
    try:
        _bench_names(row["op"], row["dtype"])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    median = row["median_ms"]
    if row["error"] is None and not (
        isinstance(median, (int, float)) and not isinstance(median, bool) and 0 < median < math.inf
    ):
        raise ValueError(f"{where}: median_ms must be a finite number of milliseconds above 0, got {median!r}")


def read_results(path: str, role: str = "results") -> Results:
    """A bench --json file of a CUDA device. `role`, "results" or "gradient-in-forward", is
    the argument it came from: a ValueError names it, the file and the problem."""
    where = f"{role} file {path}"
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: not readable as JSON ({error})") from error
    device, rows = (document.get("device"), document.get("rows")) if isinstance(document, dict) else (None, None)
    if not isinstance(device, dict) or not isinstance(device.get("name"), str) or not isinstance(rows, list):
        raise ValueError(f"{where}: not a gfl_ops bench results file (no 'device' with a 'name', or no 'rows' list)")
    if device.get("type") != "cuda":
        raise ValueError(
            f"{where}: measured on {device.get('type')!r}; tuning covers CUDA devices (Triton runs on CUDA only)"
        )
    for index, row in enumerate(rows):
        _check_row(row, f"{where}, row {index}")
    gradient_pass = "forward" if role == "gradient-in-forward" else CUDA_DEFAULT_GRADIENT_PASS
    source = dict(
        file=str(path), gradient_pass=gradient_pass, date=document.get("date"), git_commit=document.get("git_commit")
    )
    return Results(str(path), device["name"], rows, source)


def _full_medians(results: Results, provider: str) -> Dict[tuple, float]:
    """{(op, shape_label, layout, dtype): median_ms} of `provider`'s "full" rows that ran without error."""
    return {
        (row["op"], row["shape_label"], row["layout"], row["dtype"]): row["median_ms"]
        for row in results.rows
        if row["mode"] == "full" and row["provider"] == provider and row["error"] is None
    }


def _geometric_mean(ratios: Sequence[float]) -> float:
    return math.exp(sum(math.log(ratio) for ratio in ratios) / len(ratios))


def _measured(ratios: Sequence[float]) -> dict:
    return dict(ratio=round(_geometric_mean(ratios), 4), cases=len(ratios))


def native_over_triton(results: Sequence[Results]) -> Dict[str, Dict[str, dict]]:
    """{operator: {dtype name: {"ratio": geometric mean of native / triton median_ms, "cases": n}}}
    over the cases both ran in mode "full" without error, each compared within its file."""
    ratios: Dict[Tuple[str, str], List[float]] = {}
    for one in results:
        native, triton = _full_medians(one, "native"), _full_medians(one, "triton")
        for case in sorted(native.keys() & triton.keys()):
            ratios.setdefault(_bench_names(case[0], case[3]), []).append(native[case] / triton[case])
    if not ratios:
        files = ", ".join(one.path for one in results)
        raise ValueError(
            f"results files {files}: no case that native and triton both ran in mode 'full' without error "
            f"(python -m gfl_ops bench --providers native triton --json FILE)"
        )
    table: Dict[str, Dict[str, dict]] = {}
    for (operator, dtype), values in sorted(ratios.items()):
        table.setdefault(operator, {})[dtype] = _measured(values)
    return table


def forward_over_backward(results: Sequence[Results], gradient_in_forward: Sequence[Results]) -> dict:
    """{"ratio": geometric mean of native "full" median_ms with the gradient in the forward
    pass over those under the default pass, "cases": n}, over the cases both measured."""
    ratios = []
    for default_run in results:
        backward = _full_medians(default_run, "native")
        for forward_run in gradient_in_forward:
            forward = _full_medians(forward_run, "native")
            # float16 pred takes the backward pass in both runs: its ratio is noise.
            common = sorted(case for case in forward.keys() & backward.keys() if case[3] != "fp16")
            ratios += [forward[case] / backward[case] for case in common]
    if not ratios:
        files = ", ".join(one.path for one in gradient_in_forward)
        raise ValueError(
            f"gradient-in-forward files {files}: no native 'full' case (float16 aside) in common with the results files"
        )
    return _measured(ratios)


def derive_table(results_paths: Sequence[str], gradient_in_forward_paths: Sequence[str] = ()) -> Dict[str, dict]:
    """{device name: entry} from bench --json files of one CUDA device: `results_paths` run
    under the default gradient pass with native and triton, `gradient_in_forward_paths` run
    with GFL_OPS_GRADIENT_PASS=forward (native suffices). See the module's docstring."""
    if not results_paths:
        raise ValueError("results: at least one bench --json file is needed")
    results = [read_results(path, "results") for path in results_paths]
    gradient_in_forward = [read_results(path, "gradient-in-forward") for path in gradient_in_forward_paths]
    every = results + gradient_in_forward
    if len({one.device_name for one in every}) > 1:
        devices = ", ".join(f"{one.path}: {one.device_name!r}" for one in every)
        raise ValueError(f"results and gradient-in-forward files: measured on different devices ({devices})")
    ratios = native_over_triton(results)
    entry = dict(
        backends={
            operator: {dtype: "triton" if measured["ratio"] > 1 else "native" for dtype, measured in by_dtype.items()}
            for operator, by_dtype in ratios.items()
        },
        native_over_triton=ratios,
    )
    if gradient_in_forward:
        measured = forward_over_backward(results, gradient_in_forward)
        entry.update(gradient_pass="forward" if measured["ratio"] < 1 else "backward", forward_over_backward=measured)
    entry["source"] = [one.source for one in every]
    return {results[0].device_name: entry}


# --------------------------------------------------------------------------------------
# python -m gfl_ops tune
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gfl_ops tune",
        description="Write the tuning table that backend='auto' reads (gfl_ops/_tuning.py) from bench results.",
        epilog="Entries of other devices already in the output file are kept. "
        f"{ENVIRONMENT_VARIABLE}=<path> makes gfl_ops read another file, {ENVIRONMENT_VARIABLE}= none.",
    )
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="bench --json files of one CUDA device with the native and triton providers, "
        "run under the default gradient pass",
    )
    parser.add_argument(
        "--gradient-in-forward",
        nargs="+",
        default=[],
        metavar="FORWARD_RESULTS",
        help="bench --json files of the same device run with GFL_OPS_GRADIENT_PASS=forward "
        "(native suffices): the gradient pass is chosen only with them",
    )
    parser.add_argument("--output", type=Path, default=PACKAGE_TABLE, help=f"default: {PACKAGE_TABLE}")
    return parser


def _print_entry(device_name: str, entry: dict) -> None:
    print(device_name)
    for operator, by_dtype in entry["native_over_triton"].items():
        for dtype, measured in by_dtype.items():
            print(
                f"  {operator:26s} {dtype:9s} {entry['backends'][operator][dtype]:7s} "
                f"native / triton {measured['ratio']:.3f} over {measured['cases']} cases"
            )
    if "gradient_pass" in entry:
        measured = entry["forward_over_backward"]
        print(
            f"  gradient pass {entry['gradient_pass']}: forward / backward {measured['ratio']:.3f} "
            f"over {measured['cases']} cases"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        table = derive_table(args.results, args.gradient_in_forward)
    except ValueError as error:
        parser.error(str(error))
    try:
        existing = read_table(args.output) if args.output.exists() else {}
    except ValueError as error:
        parser.error(f"argument --output: {error}")
    try:
        args.output.write_text(json.dumps({**existing, **table}, indent=2, sort_keys=True) + "\n")
    except OSError as error:
        parser.error(f"argument --output: cannot write {args.output} ({error})")
    for device_name, entry in table.items():
        _print_entry(device_name, entry)
    print(f"written to {args.output}")
    return 0
