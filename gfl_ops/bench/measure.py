"""Timing and memory: a step's milliseconds, its peak extra bytes, the copy that is the
bandwidth yardstick, and the device's name."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch


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
