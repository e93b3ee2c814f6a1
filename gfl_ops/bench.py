"""The gfl_ops benchmark: providers side by side, speed, peak memory and bandwidth, in one run.

    python -m gfl_ops bench                 # the default set for the device (see below)
    python -m gfl_ops bench --quick         # headline shapes only, under a minute on 2 CPU cores
    python -m gfl_ops bench --json out.json --plot out.png

Providers (each computes the same loss from the same inputs, and the gradient of pred):
    native     gfl_ops.<fn>(..., backend="native"): the fused C++/CUDA kernels
    triton     gfl_ops.<fn>(..., backend="triton"), whenever available_backends() lists it
    reference  gfl_ops.<fn>(..., backend="reference"): the plain-PyTorch oracle, eager
    compile    torch.compile(gfl_ops.reference.<fn>, dynamic=False, fullgraph=True),
               compiled once per shape and warmed up outside the timing
    mmdet      benchmarks/mmdet_style.py: eager PyTorch as mmdetection 3.x writes it
               (channel-first inputs permuted and reshaped to (N, C) first, as it does)

Ops: qfl (logits, label/score targets), qfl_prob (probabilities), qfl_dense (dense soft
target), dfl, integral. Modes: "forward" (the loss as a training step computes it: pred
requires grad, so a fused kernel may produce the gradient in this pass) and "full"
(forward + backward, the headline).

Each (op, mode, shape, dtype) is one measurement: every provider is warmed up, then the
providers take turns, one timed step each per round (the order rotates between rounds),
so that the noise of a shared machine falls on all of them alike; a dst.copy_(src) moving
the op's byte model takes its turn too, as the bandwidth yardstick. The figure is the
median over the rounds. pred.grad is set to None between steps and the thread count is
left as torch has it.

Default set on CUDA: QFL N in {8400, 44800, 134400, 358400} x 80 and 8400 x 1203, (N, C)
and channel-first (2, C, H, W); DFL / integral rows in {4096, 16384, 65536, 262144} x {16,
17} bins; float32 and bfloat16. On CPU the default drops the largest QFL size (358400) and
DFL size (262144), the channel-first layout of qfl_prob, and bfloat16, so that it finishes
in a few minutes on a small machine: --full restores the shapes, --dtype bf16 the dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _backends, functional, reference

OPS = ("qfl", "qfl_prob", "qfl_dense", "dfl", "integral")
MODES = ("forward", "full")
PROVIDERS = ("native", "triton", "reference", "compile", "mmdet")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Shapes from GFL_MATH.md. QFL: anchors N (2 images of GFL at 800x1344, YOLOv8 batches)
# x 80 COCO classes, and LVIS's 1203 classes at N = 8400. DFL / integral: rows = 4 x
# positives, 16 or 17 bins.
QFL_ANCHORS = (8400, 44800, 134400, 358400, 537600)
QFL_CLASSES = 80
QFL_LVIS = (8400, 1203)
DFL_ROWS = (4096, 16384, 65536, 262144)
DFL_BINS = (16, 17)
QUICK_QFL = ((44800, 80), (134400, 80))
QUICK_DFL = ((16384, 17), (65536, 17))
CPU_SKIPPED_QFL_ANCHORS = (358400, 537600)
CPU_SKIPPED_DFL_ROWS = (262144,)

CHANNEL_FIRST_BATCH = 2  # (B, C, H, W) with H * W = N / B: 2 images per GPU, as GFL trains
COPY_TURN = "copy"  # the bandwidth yardstick's turn in a round of timed steps
POSITIVE_FRACTION = 0.01
BETA = 2.0
DFL_AVG_FACTOR = 4.0  # GFLHead: the 4 sides of a box, weighted by its score

# What the numbers should show (informational; printed under the table, never asserted),
# per device type: (op, mode, shape, layout, dtype) -> targets. A provider's name: native's
# minimum speedup over it. PEAK_OVER_PRED: native's largest peak extra memory over pred's
# size. PEAK_VS_REFERENCE: the smallest ratio of the eager reference's peak to native's.
# COPY_FRACTION: native's smallest share of a same-size copy's bandwidth (bytes_moved).
PEAK_OVER_PRED = "peak over pred"
PEAK_VS_REFERENCE = "peak vs reference"
COPY_FRACTION = "copy fraction"
_CPU_TARGETS = {  # the foundation issue, on the 2-core development machine
    ("qfl", "full", (44800, 80), "nc", "fp32"): {"mmdet": 5.0, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("qfl", "full", (134400, 80), "nc", "fp32"): {"mmdet": 5.0, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("dfl", "full", (16384, 17), "rows", "fp32"): {"mmdet": 2.5, "compile": 1.5, PEAK_OVER_PRED: 1.0},
    ("dfl", "full", (65536, 17), "rows", "fp32"): {"mmdet": 2.5, "compile": 1.5, PEAK_OVER_PRED: 1.0},
}
_CUDA_QFL_TARGETS = {"reference": 10.0, "compile": 1.3, COPY_FRACTION: 0.75, PEAK_VS_REFERENCE: 5.0}
_CUDA_DFL_TARGETS = {"reference": 5.0, PEAK_VS_REFERENCE: 5.0}
_CUDA_TARGETS = {  # the CUDA issue
    **{("qfl", "full", (anchors, 80), "nc", dtype): _CUDA_QFL_TARGETS
       for anchors in (134400, 537600) for dtype in ("fp32", "bf16")},
    **{("dfl", "full", (rows, 17), "rows", dtype): _CUDA_DFL_TARGETS
       for rows in (65536, 262144) for dtype in ("fp32", "bf16")},
}
HEADLINE_TARGETS = {"cpu": _CPU_TARGETS, "cuda": _CUDA_TARGETS}


# --------------------------------------------------------------------------------------
# Cases and their inputs
# --------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: pred's shape is rows x classes (bins), laid out as `layout`."""

    op: str
    rows: int  # anchors N (QFL) or rows M (DFL, integral)
    classes: int  # C (QFL) or bins n + 1
    layout: str  # "nc": (N, C); "nchw": (B, C, H, W), H * W = N / B; "rows": (M, n + 1)
    dtype: torch.dtype

    @property
    def pred_shape(self) -> Tuple[int, ...]:
        if self.layout == "nchw":
            height, width = channel_first_plane(self.rows // CHANNEL_FIRST_BATCH)
            return (CHANNEL_FIRST_BATCH, self.classes, height, width)
        return (self.rows, self.classes)

    @property
    def anchor_shape(self) -> Tuple[int, ...]:
        shape = self.pred_shape
        return (shape[0],) + shape[2:]

    @property
    def label(self) -> str:
        return "x".join(str(size) for size in self.pred_shape)

    @property
    def pred_bytes(self) -> int:
        return math.prod(self.pred_shape) * self.dtype.itemsize


def channel_first_plane(anchors_per_image: int) -> Tuple[int, int]:
    """(H, W) with H * W = anchors_per_image, as close to square as the divisors allow."""
    height = int(math.isqrt(anchors_per_image))
    while anchors_per_image % height:
        height -= 1
    return height, anchors_per_image // height


@dataclasses.dataclass
class Inputs:
    """The tensors every provider of a case reads: one set, shared by all of them."""

    pred: torch.Tensor  # a leaf that requires grad
    args: tuple  # positional arguments after pred
    kwargs: dict  # keyword arguments, identical for every provider
    grad_out: Optional[torch.Tensor] = None  # d total / d output for non-scalar outputs


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Realistic inputs: ~1% positives, avg_factor = their count as a 0-dim tensor."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    if case.op in ("qfl", "qfl_prob", "qfl_dense"):
        num_anchors = math.prod(case.anchor_shape)
        num_positive = max(1, round(POSITIVE_FRACTION * num_anchors))
        label = torch.full((num_anchors,), case.classes, dtype=torch.long)  # background = C
        positive = torch.randperm(num_anchors, generator=generator)[:num_positive]
        label[positive] = torch.randint(0, case.classes, (num_positive,), generator=generator)
        label = label.view(case.anchor_shape)
        # The IoU of the positives, in pred's dtype as the decoded boxes it comes from.
        score = rand(num_anchors).clamp_min(0.05).view(case.anchor_shape).to(case.dtype)
        logits = randn(*case.pred_shape)
        pred = torch.sigmoid(logits) if case.op == "qfl_prob" else logits
        pred = pred.to(device=device, dtype=case.dtype).requires_grad_()
        avg_factor = torch.tensor(float(num_positive), device=device)
        options = dict(beta=BETA, avg_factor=avg_factor, activated=case.op == "qfl_prob")
        if case.op == "qfl_dense":
            del options["activated"]
            target = reference.dense_target_from_labels(logits, label, score)
            return Inputs(pred, (target.to(device=device, dtype=case.dtype),), options)
        return Inputs(pred, (label.to(device), score.to(device)), options)

    pred = randn(case.rows, case.classes).to(device=device, dtype=case.dtype).requires_grad_()
    if case.op == "dfl":
        last_bin = case.classes - 1
        target = (rand(case.rows) * (last_bin - 0.1)).to(device)  # mmdet clamps to reg_max - 0.1
        weight = rand(case.rows).to(device)  # the anchor's score, per side
        return Inputs(pred, (target,), dict(weight=weight, avg_factor=DFL_AVG_FACTOR))
    if case.op == "integral":
        grad_out = randn(case.rows).to(device=device, dtype=case.dtype)
        return Inputs(pred, (), {}, grad_out=grad_out)
    raise ValueError(f"unknown op {case.op!r}; ops: {OPS}")


# --------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------

# op -> (the public function, the reference function, the gfl_ops operator name)
_OP_FUNCTIONS = {
    "qfl": (functional.quality_focal_loss, reference.quality_focal_loss, "quality_focal_loss"),
    "qfl_prob": (functional.quality_focal_loss, reference.quality_focal_loss, "quality_focal_loss"),
    "qfl_dense": (functional.quality_focal_loss_dense, reference.quality_focal_loss_dense, "quality_focal_loss_dense"),
    "dfl": (functional.distribution_focal_loss, reference.distribution_focal_loss, "distribution_focal_loss"),
    "integral": (functional.distribution_integral, reference.distribution_integral, "distribution_integral"),
}

MMDET_STYLE_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "mmdet_style.py"


@functools.lru_cache(maxsize=None)
def load_mmdet_style():
    """benchmarks/mmdet_style.py of the source checkout, or None where it is absent."""
    if not MMDET_STYLE_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gfl_ops_bench_mmdet_style", MMDET_STYLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mmdet_function(op: str, num_bins: int, device: torch.device) -> Callable:
    mmdet = load_mmdet_style()
    if op in ("qfl", "qfl_prob"):
        return mmdet.qfl_loss
    if op == "qfl_dense":
        return mmdet.qfl_dense_loss
    if op == "dfl":
        return mmdet.dfl_loss
    project = mmdet.integral_projection(num_bins, device)  # the Integral module's buffer
    return lambda pred: mmdet.integral(pred, project)


def available_providers(op: str, device: torch.device) -> List[str]:
    """The providers that can run `op` on `device`, in PROVIDERS order."""
    backends = _backends.available_backends(device, _OP_FUNCTIONS[op][2])
    names = [name for name in ("native", "triton", "reference") if name in backends]
    names.append("compile")
    if load_mmdet_style() is not None:
        names.append("mmdet")
    return [name for name in PROVIDERS if name in names]


def make_provider(name: str, case: Case, device: torch.device, compile_backend: str = "inductor") -> Callable:
    """fn(pred, *args, **kwargs) -> the loss (or E for the integral)."""
    public, ref, _ = _OP_FUNCTIONS[case.op]
    if name in ("native", "triton", "reference"):
        return functools.partial(public, backend=name)
    if name == "compile":
        # A fresh compile per shape: no recompilation limit, no dynamic shapes carried over.
        torch._dynamo.reset()
        return torch.compile(ref, dynamic=False, fullgraph=True, backend=compile_backend)
    if name == "mmdet":
        if load_mmdet_style() is None:
            raise RuntimeError(f"the mmdetection-style baseline is not at {MMDET_STYLE_PATH}")
        return _mmdet_function(case.op, case.classes, device)
    raise ValueError(f"unknown provider {name!r}; providers: {PROVIDERS}")


def run_step(fn: Callable, inputs: Inputs, mode: str) -> torch.Tensor:
    """One training step of the loss: forward, and in "full" mode backward into pred.grad."""
    output = fn(inputs.pred, *inputs.args, **inputs.kwargs)
    if mode == "full":
        output.backward(inputs.grad_out)
    return output


def clear_grad(inputs: Inputs) -> None:
    inputs.pred.grad = None  # set_to_none: the next backward allocates its gradient afresh


# --------------------------------------------------------------------------------------
# The byte model: what a fused implementation must move, at the least
# --------------------------------------------------------------------------------------


def bytes_moved(case: Case, mode: str) -> int:
    """Bytes read and written by an ideal implementation of one step.

    forward: read pred and the targets (and write the integral's output);
    full:    the forward, then read pred again and write its gradient (the 3-pass floor of
             GFL_MATH.md; the integral also reads its output's gradient).
    Scalar losses and per-row temporaries that need not reach memory are not counted.
    """
    pred = case.pred_bytes
    anchors = math.prod(case.anchor_shape)
    if case.op in ("qfl", "qfl_prob"):
        targets = anchors * (torch.int64.itemsize + torch.float32.itemsize)  # label, score
    elif case.op == "qfl_dense":
        targets = pred  # a dense target in pred's dtype
    elif case.op == "dfl":
        targets = case.rows * 2 * torch.float32.itemsize  # target, weight
    else:
        targets = case.rows * case.dtype.itemsize  # the integral writes E
    forward = pred + targets
    if mode == "forward":
        return forward
    backward = 2 * pred
    if case.op == "integral":
        backward += case.rows * case.dtype.itemsize
    return forward + backward


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


class Timer:
    """Milliseconds of one call: CUDA events around it (after a synchronize, so that the
    host's launch time is counted as a user pays it), time.perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        step()
        return (time.perf_counter() - begin) * 1e3


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ logger (kineto) writes start/stop lines to fd 2: hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak of the bytes allocated during `step` beyond those allocated before it.

    CUDA: the caching allocator's counters (max_memory_allocated after a reset, minus
    memory_allocated before). CPU: torch keeps no CPU allocator statistics, so the step
    runs once under torch.profiler with profile_memory=True, which records every
    allocation and free of torch's CPU allocator (eager ops, the native kernels and
    torch.compile's generated code alike); the peak of their running sum is the answer.
    That counts tensors, not the process's resident pages, so it is exact and unaffected
    by malloc's caching. Tensors alive after the step (pred.grad) count towards the peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    try:
        from torch.profiler import ProfilerActivity, profile

        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        cpu = torch._C._autograd.DeviceType.CPU
        events = [
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == cpu
        ]
    except (AttributeError, RuntimeError):  # a torch whose profiler lacks these records
        return None
    events.sort(key=lambda event: event[0])  # stable: events of one instant keep their order
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def make_copy(num_bytes: int, device: torch.device) -> Callable[[], object]:
    """dst.copy_(src) moving num_bytes in all (read num_bytes / 2, write num_bytes / 2):
    the bandwidth this device reaches on a plain copy, the yardstick of % copy."""
    numel = max(1, num_bytes // (2 * torch.float32.itemsize))
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages outside the timing
    return lambda: dst.copy_(src)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    device: torch.device
    modes: Sequence[str]
    providers: Optional[Sequence[str]]  # None: every available provider
    repeats: int
    warmup: int
    measure_memory: bool = True
    compile_backend: str = "inductor"


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:200]


def benchmark_case(case: Case, settings: Settings) -> List[dict]:
    """Rows for one case: every mode x provider."""
    device = settings.device
    timer = Timer(device)
    inputs = make_inputs(case, device)
    names = available_providers(case.op, device)
    if settings.providers is not None:
        names = [name for name in names if name in settings.providers]
    elif device.type == "cpu":
        # Triton on CPU is its interpreter (TRITON_INTERPRET=1): a correctness tool whose
        # times mean nothing. Only an explicit --providers triton runs it there.
        names = [name for name in names if name != "triton"]

    providers: Dict[str, Callable] = {}
    errors: Dict[str, str] = {}
    compile_seconds: Dict[str, float] = {}
    for name in names:
        try:
            fn = make_provider(name, case, device, settings.compile_backend)
            # First call outside any timing: compiles (forward and backward graphs) for
            # "compile", loads and checks the rest.
            begin = time.perf_counter()
            run_step(fn, inputs, "full" if "full" in settings.modes else settings.modes[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_seconds[name] = time.perf_counter() - begin
            providers[name] = fn
        except Exception as error:  # noqa: BLE001 - a provider that cannot run is reported
            errors[name] = _error_text(error)
        finally:
            clear_grad(inputs)

    rows = []
    for mode in settings.modes:
        times: Dict[str, List[float]] = {name: [] for name in providers}
        mode_errors = dict(errors)
        for name, fn in list(providers.items()):
            try:
                for _ in range(settings.warmup):
                    run_step(fn, inputs, mode)
                    clear_grad(inputs)
            except Exception as error:  # noqa: BLE001
                mode_errors[name] = _error_text(error)
                clear_grad(inputs)
                del times[name]
        active = list(times)
        # The copy of as many bytes takes its turn in the same rounds, so that the
        # bandwidth yardstick sees the same machine as the providers.
        num_bytes = bytes_moved(case, mode)
        copy = make_copy(num_bytes, device)
        copy_times: List[float] = []
        turns = active + [COPY_TURN]
        for round_index in range(settings.repeats):
            shift = round_index % len(turns)
            for name in turns[shift:] + turns[:shift]:
                if name == COPY_TURN:
                    copy_times.append(timer(copy))
                    continue
                if name in mode_errors:
                    continue
                fn = providers[name]
                try:
                    times[name].append(timer(lambda: run_step(fn, inputs, mode)))
                except Exception as error:  # noqa: BLE001 - e.g. out of memory at a large shape
                    mode_errors[name] = _error_text(error)
                finally:
                    clear_grad(inputs)
        del copy
        for name in active:
            if name in mode_errors:
                del times[name]
        active = list(times)

        peaks: Dict[str, Optional[int]] = {}
        if settings.measure_memory:
            for name in active:
                fn = providers[name]
                try:
                    peaks[name] = peak_extra_bytes(lambda: run_step(fn, inputs, mode), device)
                except Exception:  # noqa: BLE001 - timed already; only the memory figure is lost
                    peaks[name] = None
                finally:
                    clear_grad(inputs)

        copy_ms = statistics.median(copy_times)
        native_ms = statistics.median(times["native"]) if "native" in times else None

        for name in names:
            row = dict(
                op=case.op,
                mode=mode,
                shape=list(case.pred_shape),
                shape_label=case.label,
                layout=case.layout,
                dtype=dtype_name(case.dtype),
                provider=name,
                pred_bytes=case.pred_bytes,
                bytes_model=num_bytes,
                copy_ms=copy_ms,
                copy_gbps=num_bytes / copy_ms / 1e6,
            )
            if name in times:
                samples = times[name]
                median = statistics.median(samples)
                peak = peaks.get(name)
                row.update(
                    median_ms=median,
                    min_ms=min(samples),
                    max_ms=max(samples),
                    repeats=len(samples),
                    times_ms=samples,
                    native_speedup=None if native_ms is None else median / native_ms,
                    peak_extra_bytes=peak,
                    peak_extra_over_pred=None if peak is None else peak / case.pred_bytes,
                    achieved_gbps=num_bytes / median / 1e6,
                    bandwidth_fraction=copy_ms / median,
                    first_call_s=compile_seconds.get(name),
                    error=None,
                )
            else:
                row.update(error=mode_errors.get(name, "not run"))
            rows.append(row)
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def build_cases(
    ops: Sequence[str],
    dtypes: Sequence[torch.dtype],
    qfl_shapes: Sequence[Tuple[int, int]],
    dfl_shapes: Sequence[Tuple[int, int]],
    layouts: Sequence[str] = ("nc", "nchw"),
    channel_first_ops: Sequence[str] = ("qfl", "qfl_prob"),
) -> List[Case]:
    """qfl / qfl_prob in each of `layouts` (channel-first only for channel_first_ops),
    qfl_dense in (N, C) only (a dense target comes from the assigner as (N, C)), dfl and
    integral as rows of bins."""
    cases = []
    for dtype in dtypes:
        for op in ops:
            if op in ("dfl", "integral"):
                cases += [Case(op, rows, bins, "rows", dtype) for rows, bins in dfl_shapes]
                continue
            for anchors, classes in qfl_shapes:
                for layout in layouts:
                    if layout == "nchw" and (op not in channel_first_ops or anchors % CHANNEL_FIRST_BATCH):
                        continue
                    cases.append(Case(op, anchors, classes, layout, dtype))
    return cases


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
    return rows


# --------------------------------------------------------------------------------------
# Environment, JSON, table, plot
# --------------------------------------------------------------------------------------


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _load_average() -> Optional[List[float]]:
    """1, 5 and 15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    from . import __version__

    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        device=dict(
            type=device.type, name=device_name(device), threads=torch.get_num_threads(), cpu_count=os.cpu_count()
        ),
        versions=dict(
            gfl_ops=__version__,
            torch=torch.__version__,
            triton=_package_version("triton"),
            cuda=torch.version.cuda,
            python=platform.python_version(),
        ),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        platform=platform.platform(),
        load_average=_load_average(),
    )


def results_document(rows: List[dict], settings: Settings, argv: Sequence[str], env: Optional[dict] = None) -> dict:
    document = dict(env or environment(settings.device))
    document.update(
        load_average_after=_load_average(),
        config=dict(
            argv=list(argv),
            modes=list(settings.modes),
            repeats=settings.repeats,
            warmup=settings.warmup,
            compile_backend=settings.compile_backend,
            beta=BETA,
            positive_fraction=POSITIVE_FRACTION,
            channel_first_batch=CHANNEL_FIRST_BATCH,
            statistic="median",
            memory=settings.measure_memory,
        ),
        rows=rows,
    )
    return document


def default_results_path(device: torch.device) -> Path:
    """benchmarks/results/<device>.json beside the package (GPU runs keep their numbers)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name(device)).strip("_")
    return Path(__file__).resolve().parent.parent / "benchmarks" / "results" / f"{name}.json"


def _format(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: List[dict]) -> str:
    header = (
        "op", "mode", "shape", "dtype", "provider",
        "median ms", "min ms", "native x", "peak MB", "x pred", "GB/s", "% copy",
    )  # fmt: skip
    lines = []
    for row in rows:
        if row.get("error"):
            key = (row["op"], row["mode"], row["shape_label"], row["dtype"], row["provider"])
            cells = key + ("error: " + row["error"],)
        else:
            peak = row["peak_extra_bytes"]
            cells = (
                row["op"],
                row["mode"],
                row["shape_label"],
                row["dtype"],
                row["provider"],
                _format(row["median_ms"], ".3f"),
                _format(row["min_ms"], ".3f"),
                _format(row["native_speedup"], ".2f"),
                _format(None if peak is None else peak / 2**20, ".1f"),
                _format(row["peak_extra_over_pred"], ".2f"),
                _format(row["achieved_gbps"], ".2f"),
                _format(None if row["bandwidth_fraction"] is None else 100 * row["bandwidth_fraction"], ".1f"),
            )
        lines.append(cells)
    widths = [len(name) for name in header]
    for cells in lines:
        # An error row's last cell is its message, which spans the figures' columns.
        for index, cell in enumerate(cells if len(cells) == len(header) else cells[:-1]):
            widths[index] = max(widths[index], len(cell))
    numeric = set(range(5, len(header)))

    def render(cells):
        if len(cells) < len(header):  # an error row: the message spans the figures
            return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])) + "  " + cells[-1]
        return "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        )

    out = [render(header), render(tuple("-" * width for width in widths))]
    previous = None
    for row, cells in zip(rows, lines):
        key = (row["op"], row["mode"], row["shape_label"], row["dtype"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(render(cells))
    out.append("")
    legend = (
        "min ms: the fastest round (far below the median: a busy machine). "
        "native x: the provider's median time / native's (how many times faster native is). "
        "peak MB: peak bytes allocated during the step beyond those before it (pred.grad "
        "included); x pred: that over pred's size. GB/s: the byte model (bytes_moved) over "
        "the time; % copy: that over a dst.copy_(src) moving as many bytes, timed in the same rounds."
    )
    out += textwrap.wrap(legend, width=100)
    return "\n".join(out)


def _measured(found: Dict[str, dict], name: str) -> Optional[Tuple[float, str]]:
    """A target's measured value and its description, or None where this run lacks it."""
    native = found["native"]
    if name == PEAK_OVER_PRED:
        over = native["peak_extra_over_pred"]
        return None if over is None else (over, f"peak {over:.2f}x pred")
    if name == PEAK_VS_REFERENCE:
        reference = found.get("reference", {}).get("peak_extra_bytes")
        if not reference or not native["peak_extra_bytes"]:
            return None
        ratio = reference / native["peak_extra_bytes"]
        return ratio, f"peak {ratio:.1f}x below reference"
    if name == COPY_FRACTION:
        fraction = native["bandwidth_fraction"]
        return fraction, f"{fraction:.0%} of copy bandwidth"
    if name not in found:
        return None
    speedup = found[name]["native_speedup"]
    return speedup, f"{speedup:.2f}x {name}"


def _target_verdicts(found: Dict[str, dict], targets: dict) -> List[str]:
    """'<measured> (target <bound>: met|MISSED)' for each target this run measured."""
    parts = []
    for name, bound in targets.items():
        measured = _measured(found, name)
        if measured is None:
            continue
        value, text = measured
        if name == PEAK_OVER_PRED:
            # "One buffer of pred's size": the 0-dim outputs (the loss, its mean: tens of
            # bytes) are no buffer, hence the 0.1% of slack.
            met, bound_text = value <= bound * 1.001, f"<= {bound:g}x"
        elif name == COPY_FRACTION:
            met, bound_text = value >= bound, f">= {bound:.0%}"
        else:
            met, bound_text = value >= bound, f">= {bound:g}x"
        parts.append(f"{text} (target {bound_text}: {'met' if met else 'MISSED'})")
    return parts


def format_headlines(rows: List[dict], device_type: str = "cpu") -> str:
    """The targets of HEADLINE_TARGETS[device_type] that this run measured, met or not."""
    lines = []
    for (op, mode, shape, layout, dtype), targets in HEADLINE_TARGETS.get(device_type, {}).items():
        found = {
            row["provider"]: row
            for row in rows
            if (row["op"], row["mode"], row["layout"], row["dtype"]) == (op, mode, layout, dtype)
            and tuple(row["shape"]) == shape
            and not row.get("error")
        }
        if "native" not in found:
            continue
        label = "x".join(map(str, shape))
        lines.append(f"  {op} {mode} {label} {layout} {dtype}: native " + ", ".join(_target_verdicts(found, targets)))
    return "Headline targets (informational):\n" + "\n".join(lines) if lines else ""


def write_plot(rows: List[dict], path: Path) -> str:
    """A PNG of native's speedup over each other provider, per shape; one panel per op and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return f"no plot written: matplotlib is not installed (pip install matplotlib), {path} skipped"
    measured = [row for row in rows if not row.get("error") and row.get("native_speedup") is not None]
    panels = sorted(
        {(row["op"], row["mode"]) for row in measured}, key=lambda key: (OPS.index(key[0]), MODES.index(key[1]))
    )
    if not panels:
        return f"no plot written: no provider was measured against native, {path} skipped"
    others = [name for name in PROVIDERS if name != "native" and any(row["provider"] == name for row in measured)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for axis, (op, mode) in zip(axes[:, 0], panels):
        panel_rows = [row for row in measured if (row["op"], row["mode"]) == (op, mode)]
        labels = list(dict.fromkeys(f"{row['shape_label']} {row['dtype']}" for row in panel_rows))
        width = 0.8 / max(len(others), 1)
        for index, provider in enumerate(others):
            speedups = {
                f"{row['shape_label']} {row['dtype']}": row["native_speedup"]
                for row in panel_rows
                if row["provider"] == provider
            }
            positions = [i + (index - (len(others) - 1) / 2) * width for i in range(len(labels))]
            values = [speedups.get(label, 1.0) for label in labels]
            # Bars grow from 1x (no speedup), up or down, on a log scale.
            bars = axis.bar(positions, [v - 1.0 for v in values], width, bottom=1.0, label=f"vs {provider}")
            texts = [f"{speedups[label]:.1f}" if label in speedups else "" for label in labels]
            axis.bar_label(bars, labels=texts, fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("native speedup (x)")
        axis.set_title(f"{op} {mode}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    """"44800x80,134400x80" -> [(44800, 80), (134400, 80)]."""
    shapes = []
    for item in text.split(","):
        try:
            rows, classes = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is ROWSxCLASSES, e.g. 44800x80; got {item!r}") from None
        shapes.append((rows, classes))
    return shapes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gfl_ops bench",
        description="Benchmark gfl_ops against the eager reference, torch.compile and mmdetection-style eager.",
        epilog="On CPU the default set skips QFL N=358400, DFL 262144 rows, qfl_prob's channel-first "
        "layout and bfloat16 (pass --full / --dtype bf16). GPU runs write benchmarks/results/<device>.json "
        "unless --json is given; CPU runs write JSON only to --json.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="default: all (quick: qfl dfl)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: forward full (quick: full)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: every available one (on CPU, triton only when named)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: fp32 (+ bf16 on CUDA)")
    parser.add_argument("--layouts", nargs="+", choices=("nc", "nchw"), help="QFL pred layouts (default: both)")
    parser.add_argument("--quick", action="store_true", help="headline shapes (qfl, dfl), fp32, full mode, one warm-up")
    parser.add_argument("--full", action="store_true", help="every shape, also on CPU")
    parser.add_argument("--qfl-shapes", type=_parse_shapes, metavar="NxC,...", help="override the QFL shapes")
    parser.add_argument(
        "--dfl-shapes", type=_parse_shapes, metavar="MxBINS,...", help="override the DFL/integral shapes"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10 on CUDA, 7 on CPU and with --quick)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per provider before timing (default 2, 1 with --quick)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument(
        "--compile-backend", default="inductor", metavar="NAME", help="torch.compile backend of the compile provider"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of native's speedups")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def plan(args: argparse.Namespace) -> Tuple[List[Case], Settings, List[str]]:
    """The cases and settings the arguments ask for, and notes on what the defaults left out."""
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    notes = []
    if args.dtype:
        dtypes = [DTYPES[name] for name in args.dtype]
    elif device.type == "cuda" and not args.quick and torch.cuda.is_bf16_supported():
        dtypes = [torch.float32, torch.bfloat16]
    else:
        dtypes = [torch.float32]
        if on_cpu and not args.quick:
            notes.append("bfloat16 skipped on CPU (--dtype fp32 bf16 to add it)")

    if args.quick:
        ops = args.ops or ["qfl", "dfl"]
        modes = args.modes or ["full"]
        qfl_shapes, dfl_shapes = list(QUICK_QFL), list(QUICK_DFL)
    else:
        ops = args.ops or list(OPS)
        modes = args.modes or list(MODES)
        qfl_shapes = [(anchors, QFL_CLASSES) for anchors in QFL_ANCHORS] + [QFL_LVIS]
        dfl_shapes = [(rows, bins) for rows in DFL_ROWS for bins in DFL_BINS]
        if on_cpu and not args.full:
            qfl_shapes = [shape for shape in qfl_shapes if shape[0] not in CPU_SKIPPED_QFL_ANCHORS]
            dfl_shapes = [shape for shape in dfl_shapes if shape[0] not in CPU_SKIPPED_DFL_ROWS]
            notes.append(
                f"CPU default: QFL N={CPU_SKIPPED_QFL_ANCHORS}, DFL rows={CPU_SKIPPED_DFL_ROWS} and "
                "qfl_prob's channel-first layout skipped (--full to run them)"
            )
    qfl_shapes = args.qfl_shapes or qfl_shapes
    dfl_shapes = args.dfl_shapes or dfl_shapes
    channel_first_ops = ("qfl",) if on_cpu and not args.full else ("qfl", "qfl_prob")
    cases = build_cases(ops, dtypes, qfl_shapes, dfl_shapes, args.layouts or ("nc", "nchw"), channel_first_ops)

    default_repeats = 7 if args.quick else (10 if device.type == "cuda" else 7)
    settings = Settings(
        device=device,
        modes=modes,
        providers=args.providers,
        repeats=args.repeats or default_repeats,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        measure_memory=not args.no_memory,
        compile_backend=args.compile_backend,
    )
    if on_cpu and args.providers is None and "triton" in _backends.available_backends(device):
        notes.append("triton skipped: on CPU it is the Triton interpreter (--providers triton to run it anyway)")
    if load_mmdet_style() is None:
        notes.append(f"mmdet provider skipped: {MMDET_STYLE_PATH} not found (run from a source checkout)")
    return cases, settings, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases, settings, notes = plan(args)
    env = environment(settings.device)
    print(
        f"gfl_ops bench on {env['device']['name']} ({settings.device.type}, {env['device']['threads']} threads), "
        f"torch {env['versions']['torch']}, {len(cases)} cases x modes {list(settings.modes)}, "
        f"{settings.repeats} repeats after {settings.warmup} warm-up",
        flush=True,
    )
    load = env["load_average"]
    if settings.device.type == "cpu" and load and load[0] > 0.5:
        notes.append(
            f"the machine is busy (load average {load[0]:.2f} on {os.cpu_count()} cores): "
            "CPU timings will be noisy; providers take turns, so ratios suffer less than times"
        )
    for note in notes:
        print("note: " + note, flush=True)
    started = time.perf_counter()
    rows = run(cases, settings)
    print()
    print(format_table(rows))
    headlines = format_headlines(rows, settings.device.type)
    if headlines:
        print()
        print(headlines)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s")

    document = results_document(rows, settings, argv, env)
    json_path = args.json
    if json_path is None and settings.device.type == "cuda":
        json_path = default_results_path(settings.device)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"results written to {json_path}")
    else:
        print("no JSON written (CPU run): pass --json PATH to keep the numbers")
    if args.plot is not None:
        print(write_plot(rows, args.plot))
    return 0
