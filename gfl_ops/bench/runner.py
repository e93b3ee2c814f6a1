"""The run: each (op, mode, shape, dtype) is one measurement.

Every provider is warmed up, then the providers take turns, one timed step each per round
(the order rotates between rounds), so that the noise of a shared machine falls on all of
them alike; a dst.copy_(src) moving the op's byte model takes its turn too, as the
bandwidth yardstick. The figure is the median over the rounds. pred.grad is set to None
between steps and the thread count is left as torch has it. A provider that fails is an
error row, never an exception out of the run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import roofline
from .cases import Case, Inputs, dtype_name
from .measure import Timer, device_name, make_copy, peak_extra_bytes
from .ops import bytes_moved, make_inputs
from .providers import clear_grad, make_provider, run_step, select_providers

COPY_TURN = "copy"  # the bandwidth yardstick's turn in a round of timed steps


@dataclasses.dataclass
class Settings:
    device: torch.device
    modes: Sequence[str]
    providers: Optional[Sequence[str]]  # None: every available provider
    repeats: int
    warmup: int
    measure_memory: bool = True
    compile_backend: str = "inductor"


@dataclasses.dataclass
class _Prepared:
    """A case's inputs and the providers whose first call ran (or why it failed)."""

    case: Case
    inputs: Inputs
    names: List[str]  # the providers that run the case, in PROVIDERS order
    providers: Dict[str, Callable] = dataclasses.field(default_factory=dict)
    errors: Dict[str, str] = dataclasses.field(default_factory=dict)
    first_call_s: Dict[str, float] = dataclasses.field(default_factory=dict)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:200]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepare(case: Case, names: List[str], settings: Settings) -> _Prepared:
    """Each provider made and called once outside any timing: that compiles (forward and
    backward graphs) for "compile", and loads and checks the rest."""
    prepared = _Prepared(case, make_inputs(case, settings.device), names)
    first_mode = "full" if "full" in settings.modes else settings.modes[0]
    for name in names:
        try:
            fn = make_provider(name, case, settings.device, settings.compile_backend)
            begin = time.perf_counter()
            run_step(fn, prepared.inputs, first_mode)
            _sync(settings.device)
            prepared.first_call_s[name] = time.perf_counter() - begin
            prepared.providers[name] = fn
        except Exception as error:  # noqa: BLE001 - a provider that cannot run is reported
            prepared.errors[name] = _error_text(error)
        finally:
            clear_grad(prepared.inputs)
    return prepared


def _warm_up(prepared: _Prepared, mode: str, warmup: int, errors: Dict[str, str]) -> List[str]:
    """The providers still standing after `warmup` untimed steps each."""
    for name, fn in prepared.providers.items():
        try:
            for _ in range(warmup):
                run_step(fn, prepared.inputs, mode)
                clear_grad(prepared.inputs)
        except Exception as error:  # noqa: BLE001
            errors[name] = _error_text(error)
            clear_grad(prepared.inputs)
    return [name for name in prepared.providers if name not in errors]


def _timed_rounds(prepared: _Prepared, active: List[str], mode: str, settings: Settings, copy: Callable):
    """({provider: [ms per round]}, [copy ms per round], {provider: error}): the providers
    and the copy take turns in each round, the order rotating between rounds."""
    timer = Timer(settings.device)
    times: Dict[str, List[float]] = {name: [] for name in active}
    copy_times: List[float] = []
    errors: Dict[str, str] = {}
    turns = active + [COPY_TURN]
    for round_index in range(settings.repeats):
        shift = round_index % len(turns)
        for name in turns[shift:] + turns[:shift]:
            if name == COPY_TURN:
                copy_times.append(timer(copy))
                continue
            if name in errors:
                continue
            fn = prepared.providers[name]
            try:
                times[name].append(timer(lambda: run_step(fn, prepared.inputs, mode)))
            except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large shape
                errors[name] = _error_text(error)
            finally:
                clear_grad(prepared.inputs)
    return {name: samples for name, samples in times.items() if name not in errors}, copy_times, errors


def _peaks(prepared: _Prepared, names: List[str], mode: str, device: torch.device) -> Dict[str, Optional[int]]:
    peaks: Dict[str, Optional[int]] = {}
    for name in names:
        fn = prepared.providers[name]
        try:
            peaks[name] = peak_extra_bytes(lambda: run_step(fn, prepared.inputs, mode), device)
        except Exception:  # noqa: BLE001 - timed already; only the memory figure is lost
            peaks[name] = None
        finally:
            clear_grad(prepared.inputs)
    return peaks


def _case_fields(case: Case, mode: str, provider: str, num_bytes: int, copy_ms: float) -> dict:
    return dict(
        op=case.op,
        mode=mode,
        shape=list(case.pred_shape),
        shape_label=case.label,
        layout=case.layout,
        dtype=dtype_name(case.dtype),
        provider=provider,
        pred_bytes=case.pred_bytes,
        bytes_model=num_bytes,
        copy_ms=copy_ms,
        copy_gbps=num_bytes / copy_ms / 1e6,
        **roofline.floor_fields(num_bytes),
    )


def _measured_fields(
    row: dict, samples: List[float], peak: Optional[int], native_ms: Optional[float], device: str
) -> dict:
    median = statistics.median(samples)
    return dict(
        median_ms=median,
        min_ms=min(samples),
        max_ms=max(samples),
        repeats=len(samples),
        times_ms=samples,
        native_speedup=None if native_ms is None else median / native_ms,
        peak_extra_bytes=peak,
        peak_extra_over_pred=None if peak is None else peak / row["pred_bytes"],
        achieved_gbps=row["bytes_model"] / median / 1e6,
        bandwidth_fraction=row["copy_ms"] / median,
        floor_fraction=roofline.floor_fraction(row["bytes_model"], median, device),
    )


def _benchmark_mode(prepared: _Prepared, mode: str, settings: Settings) -> List[dict]:
    """The rows of one mode: warm-up, the timed rounds, then the peak memory of each."""
    errors = dict(prepared.errors)
    active = _warm_up(prepared, mode, settings.warmup, errors)
    # The copy of as many bytes takes its turn in the same rounds, so that the bandwidth
    # yardstick sees the same machine as the providers.
    num_bytes = bytes_moved(prepared.case, mode)
    copy = make_copy(num_bytes, settings.device)
    times, copy_times, round_errors = _timed_rounds(prepared, active, mode, settings, copy)
    del copy
    errors.update(round_errors)
    peaks = _peaks(prepared, list(times), mode, settings.device) if settings.measure_memory else {}
    native_ms = statistics.median(times["native"]) if "native" in times else None
    rows = []
    device = device_name(settings.device)
    for name in prepared.names:
        row = _case_fields(prepared.case, mode, name, num_bytes, statistics.median(copy_times))
        if name in times:
            row.update(_measured_fields(row, times[name], peaks.get(name), native_ms, device))
            row.update(first_call_s=prepared.first_call_s.get(name), error=None)
        else:
            row.update(error=errors.get(name, "not run"))
        rows.append(row)
    return rows


def benchmark_case(case: Case, settings: Settings) -> List[dict]:
    """Rows for one case: every mode x provider that runs it (providers.select_providers)."""
    names, _ = select_providers(case.op, settings.device, settings.providers)
    prepared = _prepare(case, names, settings)
    rows = [row for mode in settings.modes for row in _benchmark_mode(prepared, mode, settings)]
    del prepared
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_fp32_ratios(rows: List[dict]) -> List[dict]:
    """Each measured row's fp32_ratio: its median over the float32 row of the same run with
    the same provider, op, mode, shape and layout (None where that row is absent)."""

    def key(row):
        return (row["provider"], row["op"], row["mode"], tuple(row["shape"]), row["layout"])

    fp32 = {key(row): row["median_ms"] for row in rows if row["dtype"] == "fp32" and not row.get("error")}
    for row in rows:
        if not row.get("error"):
            base = fp32.get(key(row))
            row["fp32_ratio"] = None if base is None else row["median_ms"] / base
    return rows


def _progress(total: int):
    """tqdm where installed, else a counter on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit="case", file=sys.stderr)
        return bar.set_description, lambda: bar.update(1), bar.close
    state = {"done": 0}

    def start(label):
        print(f"[{state['done'] + 1}/{total}] {label}", file=sys.stderr, flush=True)

    def advance():
        state["done"] += 1

    return start, advance, lambda: None


def run(cases: Sequence[Case], settings: Settings, progress: bool = True) -> List[dict]:
    rows: List[dict] = []
    start, advance, close = _progress(len(cases)) if progress else (lambda _: None, lambda: None, lambda: None)
    try:
        for case in cases:
            start(f"{case.op} {case.label} {dtype_name(case.dtype)} ({', '.join(settings.modes)})")
            rows += benchmark_case(case, settings)
            advance()
    finally:
        close()
    return add_fp32_ratios(rows)
