"""Every operator through the public functions, forward and backward, on small inputs of
every layout the kernels walk, then every registered operator on its own sample inputs
(gfl_ops/_registry.py: every argument, present and absent): the workload that
benchmarks/gpu_session.sh runs under compute-sanitizer (memcheck, racecheck) and under
torch.cuda.set_sync_debug_mode("error").

    python benchmarks/gpu_workload.py [--device cuda] [--backends native triton] [--sync-debug]

--sync-debug runs the workload once to warm up (Triton compiles, the allocator grows), then
again with synchronizing CUDA calls raising: the functions' defaults make no host sync.
"""

from __future__ import annotations

import argparse
import sys

import torch

import gfl_ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def class_preds(device: str, dtype: torch.dtype):
    """(name, pred) of each walk: aligned rows, rows not aligned to 16 bytes (C = 81), a
    (B, C, H, W) head output read in place, and its channels-last form."""
    yield "rows", torch.randn(1000, 80, device=device, dtype=dtype)
    yield "unaligned rows", torch.randn(1000, 81, device=device, dtype=dtype)
    yield "planes", torch.randn(2, 80, 12, 20, device=device, dtype=dtype)
    yield "channels last", torch.randn(2, 12, 20, 80, device=device, dtype=dtype).permute(0, 3, 1, 2)


def anchor_shape(pred: torch.Tensor) -> tuple:
    return (pred.shape[0],) + tuple(pred.shape[2:])


def classification_calls(pred: torch.Tensor, backend: str):
    """(name, loss function of pred) of the four classification operators."""
    num_classes = pred.shape[1]
    anchors = anchor_shape(pred)
    label = torch.randint(0, num_classes + 1, anchors, device=pred.device)  # C: background
    score = torch.rand(anchors, device=pred.device)
    dense = torch.rand(pred.shape, device=pred.device) * (torch.rand(pred.shape, device=pred.device) < 0.05)
    weight = torch.rand(anchors, device=pred.device)
    yield "qfl", lambda x: gfl_ops.quality_focal_loss(x, label, score, weight=weight, backend=backend)
    yield (
        "qfl beta 1.5 sum",
        lambda x: gfl_ops.quality_focal_loss(x, label, score, beta=1.5, reduction="sum", backend=backend),
    )
    yield "qfl dense", lambda x: gfl_ops.quality_focal_loss_dense(x, dense, backend=backend)
    yield "focal", lambda x: gfl_ops.sigmoid_focal_loss(x, label, backend=backend)
    yield "focal none", lambda x: gfl_ops.sigmoid_focal_loss(x, dense, reduction="none", backend=backend).sum()
    yield "varifocal", lambda x: gfl_ops.varifocal_loss(x, dense, backend=backend)


def box_calls(device: str, dtype: torch.dtype, backend: str):
    """(name, pred, loss function of pred) of DFL and the integral, 17 and 16 bins."""
    for bins in (17, 16):
        pred = torch.randn(4000, bins, device=device, dtype=dtype)
        target = torch.rand(4000, device=device) * (bins - 1)
        yield f"dfl {bins}", pred, lambda x, t=target: gfl_ops.distribution_focal_loss(x, t, backend=backend)
        yield f"integral {bins}", pred, lambda x: gfl_ops.distribution_integral(x, backend=backend).sum()


def registered_samples(device: str):
    """{dtype: [(operator, sample)]} of every registered operator's samples on `device`, built
    once, before any pass under the sync-debug mode (they are copied to the device)."""
    operators = gfl_ops._registry.OPERATORS
    return {
        dtype: [
            (name, sample) for name, operator in operators.items() for sample in operator.samples(device, dtype, False)
        ]
        for dtype in DTYPES
    }


def registered_operator_call(name: str, sample: dict, backend: str):
    """The summed value of torch.ops.gfl_ops.<name> on the sample, as a function of pred."""
    op = getattr(torch.ops.gfl_ops, name)
    return lambda x: op(*gfl_ops._registry.positional("gfl_ops", name, {**sample, "pred": x, "backend": backend})).sum()


def workload(device: str, backends, samples) -> int:
    """Runs every call, forward and backward; returns how many ran."""
    ran = 0
    for backend in backends:
        for dtype in DTYPES:
            if dtype == torch.float64 and backend == "triton":
                continue  # the Triton kernels' float64 is for gradcheck; the native one is here
            for _, pred in class_preds(device, dtype):
                for _, loss_of in classification_calls(pred, backend):
                    leaf = pred.detach().requires_grad_()
                    loss_of(leaf).backward()
                    ran += 1
            calls = [(pred, loss_of) for _, pred, loss_of in box_calls(device, dtype, backend)]
            calls += [
                (sample["pred"], registered_operator_call(name, sample, backend)) for name, sample in samples[dtype]
            ]
            for pred, loss_of in calls:
                leaf = pred.detach().requires_grad_()
                loss_of(leaf).backward()
                ran += 1
    return ran


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", default=None, help="default: native and triton where available")
    parser.add_argument("--sync-debug", action="store_true")
    args = parser.parse_args(argv)
    backends = args.backends or [b for b in ("native", "triton") if b in gfl_ops.available_backends(args.device)]
    samples = registered_samples(args.device)
    ran = workload(args.device, backends, samples)
    if args.sync_debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ran = workload(args.device, backends, samples)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(
        f"workload done: {ran} calls, forward and backward, backends {backends}"
        + (", no host sync" if args.sync_debug else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
