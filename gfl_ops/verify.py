"""python -m gfl_ops verify: check every available backend's gradients on this device.

For each op and each backend available on the device (gfl_ops.available_backends):

- gradcheck: torch.autograd.gradcheck in float64 through the backend's own kernels
  (backends that take float64: all of them);
- parity: the loss and the gradient in float32 and bfloat16 (and float16) against the
  float64 reference, on random inputs of several shapes, contiguous and not.

The parity tolerance follows the flash-attention tests: a backend's error against the
float64 reference may be at most PARITY_FACTOR times the error of the reference itself
computed in that dtype (or the rounding error of the dtype, if larger), plus two units of
the dtype at the output's scale. Prints a pass/fail table; exits non-zero on any failure,
so it can run in a user's CI or on a new GPU before training.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import available_backends, functional, reference
from ._command_line import device_argument
from ._ops import KERNEL_BACKENDS

PARITY_FACTOR = 3.0


@dataclass
class Case:
    """One input of one op: builds (pred, call) where call(pred, backend) returns the output."""

    op: str
    operator: str  # the registered operator it calls (_registry.OPERATORS)
    shape: str
    build: Callable[[torch.dtype, str, torch.Generator], Tuple[Tensor, Callable[[Tensor, str], Tensor]]]
    # False where the gradient is by design not the loss's derivative (a detached weight,
    # which finite differences see): parity against the reference only.
    gradcheck: bool = True


@dataclass
class Outcome:
    op: str
    backend: str
    check: str
    dtype: str
    shape: str
    passed: bool
    detail: str


def _class_pred(layout: str, anchors: int, classes: int, dtype, device, gen, activated=False) -> Tensor:
    """(N, C) logits, a (B, C, H, W) head output, or a channels-last / sliced view of one."""

    def randn(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2
        return (torch.sigmoid(x).clamp(0.02, 0.98) if activated else x).to(dtype).to(device)

    if layout == "rows":
        return randn(anchors, classes)
    if layout == "nchw":
        return randn(2, classes, anchors // 4, 2)
    if layout == "channels_last":
        return randn(2, anchors // 4, 2, classes).permute(0, 3, 1, 2)
    if layout == "sliced":
        return randn(anchors, classes + 3)[:, 1 : classes + 1]
    raise ValueError(layout)


def _labels(pred: Tensor, gen) -> Tuple[Tensor, Tensor]:
    shape = (pred.shape[0],) + tuple(pred.shape[2:])
    classes = pred.shape[1]
    label = torch.randint(0, classes + classes // 2 + 1, shape, generator=gen)  # a third background
    score = torch.rand(shape, generator=gen, dtype=torch.float64)
    return label.to(pred.device), score.to(pred.device)


def _qfl_case(layout: str, anchors: int, classes: int, activated: bool, beta: float = 2.0) -> Case:
    def build(dtype, device, gen):
        pred = _class_pred(layout, anchors, classes, dtype, device, gen, activated)
        label, score = _labels(pred, gen)
        weight = torch.rand(label.shape, generator=gen, dtype=torch.float64).to(device)

        def call(p: Tensor, backend: str) -> Tensor:
            acc = reference.accumulate_dtype(p.dtype)
            return functional.quality_focal_loss(
                p,
                label,
                score.to(acc),
                weight=weight.to(acc),
                beta=beta,
                reduction="none",
                activated=activated,
                backend=backend,
            )

        return pred, call

    name = "qfl_prob" if activated else "qfl"
    return Case(name, "quality_focal_loss", f"{layout} {anchors}x{classes} beta={beta}", build)


def _qfl_dense_case(layout: str, anchors: int, classes: int, beta: float = 2.0) -> Case:
    def build(dtype, device, gen):
        pred = _class_pred(layout, anchors, classes, dtype, device, gen)
        soft = torch.rand(pred.shape, generator=gen, dtype=torch.float64)
        target = torch.where(torch.rand(pred.shape, generator=gen) < 0.2, soft, 0.0).to(device)

        def call(p: Tensor, backend: str) -> Tensor:
            return functional.quality_focal_loss_dense(
                p, target.to(p.dtype), beta=beta, reduction="none", backend=backend
            )

        return pred, call

    return Case("qfl_dense", "quality_focal_loss_dense", f"{layout} {anchors}x{classes} beta={beta}", build)


def _focal_case(layout: str, anchors: int, classes: int, dense: bool, gamma: float, activated: bool = False) -> Case:
    """Sigmoid focal loss against labels or a soft target, with an anchor weight; on logits
    or (activated) probabilities."""

    def build(dtype, device, gen):
        pred = _class_pred(layout, anchors, classes, dtype, device, gen, activated)
        label, _ = _labels(pred, gen)
        soft = torch.rand(pred.shape, generator=gen, dtype=torch.float64).to(device)
        weight = torch.rand(label.shape, generator=gen, dtype=torch.float64).to(device)

        def call(p: Tensor, backend: str) -> Tensor:
            acc = reference.accumulate_dtype(p.dtype)
            return functional.sigmoid_focal_loss(
                p,
                soft.to(p.dtype) if dense else label,
                gamma=gamma,
                weight=weight.to(acc),
                reduction="none",
                activated=activated,
                backend=backend,
            )

        return pred, call

    form = f"{'soft' if dense else 'labels'} gamma={gamma}{' probabilities' if activated else ''}"
    return Case("focal", "sigmoid_focal_loss", f"{layout} {anchors}x{classes} {form}", build)


def _varifocal_case(layout: str, anchors: int, classes: int, dense: bool, detach_weight: bool) -> Case:
    """Varifocal loss against a dense IoU target or (label, score), with a class weight."""

    def build(dtype, device, gen):
        pred = _class_pred(layout, anchors, classes, dtype, device, gen)
        label, score = _labels(pred, gen)
        soft = torch.rand(pred.shape, generator=gen, dtype=torch.float64)
        target = torch.where(torch.rand(pred.shape, generator=gen) < 0.2, soft, 0.0).to(device)
        class_weight = torch.rand(classes, generator=gen, dtype=torch.float64).to(device) + 0.5

        def call(p: Tensor, backend: str) -> Tensor:
            acc = reference.accumulate_dtype(p.dtype)
            return functional.varifocal_loss(
                p,
                target.to(p.dtype) if dense else (label, score.to(acc)),
                detach_weight=detach_weight,
                class_weight=class_weight.to(acc),
                reduction="none",
                backend=backend,
            )

        return pred, call

    form = "dense" if dense else "labels"
    return Case(
        "varifocal",
        "varifocal_loss",
        f"{layout} {anchors}x{classes} {form}{' detached' if detach_weight else ''}",
        build,
        gradcheck=not detach_weight,
    )


def _bin_pred(layout: str, rows: int, bins: int, dtype, device, gen) -> Tensor:
    x = torch.randn(rows * 2 if layout == "strided" else rows, bins, generator=gen, dtype=torch.float64) * 2
    x = x.to(dtype).to(device)
    return x[::2] if layout == "strided" else x


def _dfl_case(layout: str, rows: int, bins: int) -> Case:
    def build(dtype, device, gen):
        pred = _bin_pred(layout, rows, bins, dtype, device, gen)
        target = torch.rand(rows, generator=gen, dtype=torch.float64) * (bins - 1)
        target[0] = bins - 1  # the last bin is a valid target
        target = target.to(device)

        def call(p: Tensor, backend: str) -> Tensor:
            return functional.distribution_focal_loss(
                p, target.to(reference.accumulate_dtype(p.dtype)), reduction="none", backend=backend
            )

        return pred, call

    return Case("dfl", "distribution_focal_loss", f"{layout} {rows}x{bins}", build)


def _integral_case(layout: str, rows: int, bins: int) -> Case:
    def build(dtype, device, gen):
        pred = _bin_pred(layout, rows, bins, dtype, device, gen)
        return pred, lambda p, backend: functional.distribution_integral(p, backend=backend)

    return Case("integral", "distribution_integral", f"{layout} {rows}x{bins}", build)


def cases() -> List[Case]:
    """Shapes small enough for gradcheck, odd sizes, every layout the kernels walk
    differently; exponents with a closed form (0, 1, 1.5, 2) and one that takes pow (2.5),
    on logits and on probabilities (the GPU's device maths differs on each)."""
    return [
        _qfl_case("rows", 24, 80, activated=False),
        _qfl_case("nchw", 24, 7, activated=False),
        _qfl_case("channels_last", 24, 13, activated=False),
        _qfl_case("sliced", 9, 37, activated=False),
        _qfl_case("rows", 20, 11, activated=False, beta=1.5),
        _qfl_case("nchw", 16, 6, activated=False, beta=2.5),
        _qfl_case("rows", 12, 19, activated=True),
        _qfl_case("rows", 12, 9, activated=True, beta=1.5),
        _qfl_dense_case("rows", 12, 21),
        _qfl_dense_case("nchw", 16, 5),
        _qfl_dense_case("rows", 14, 10, beta=0.0),
        _qfl_dense_case("nchw", 12, 4, beta=1.0),
        _focal_case("rows", 24, 80, dense=False, gamma=2.0),
        _focal_case("nchw", 16, 7, dense=True, gamma=1.5),
        _focal_case("rows", 12, 9, dense=False, gamma=2.0, activated=True),
        _varifocal_case("rows", 24, 13, dense=True, detach_weight=False),
        _varifocal_case("channels_last", 16, 9, dense=False, detach_weight=True),
        _dfl_case("rows", 40, 17),
        _dfl_case("rows", 21, 8),
        _dfl_case("strided", 13, 16),
        _integral_case("rows", 37, 17),
        _integral_case("strided", 11, 5),
    ]


def parity_bound(actual: Tensor, oracle: Tensor, baseline: Tensor) -> Tuple[float, float]:
    """(error, allowed error) of `actual` against the float64 oracle; see the module docstring."""
    a, e, b = actual.double().cpu(), oracle.double().cpu(), baseline.double().cpu()
    error = (a - e).abs().max().item() if a.numel() else 0.0
    baseline_error = (b - e).abs().max().item() if b.numel() else 0.0
    rounding = (e.to(actual.dtype).double() - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    atol = 2 * torch.finfo(actual.dtype).eps * scale
    return error, PARITY_FACTOR * max(baseline_error, rounding) + atol


def _value_and_grad(call, pred: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    leaf = pred.detach().requires_grad_()
    out = call(leaf, backend)
    upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64, device=out.device).view(out.shape)
    (grad,) = torch.autograd.grad((out.double() * upstream).sum(), leaf)
    return out.detach(), grad


def _check_parity(case: Case, backend: str, dtype: torch.dtype, device: str, seed: int) -> Outcome:
    pred, call = case.build(dtype, device, torch.Generator().manual_seed(seed))
    out, grad = _value_and_grad(call, pred, backend)
    out_ref, grad_ref = _value_and_grad(call, pred, "reference")  # the reference in this dtype
    out64, grad64 = _value_and_grad(call, pred.double(), "reference")
    failures = []
    for name, actual, baseline, oracle in (("loss", out, out_ref, out64), ("grad", grad, grad_ref, grad64)):
        if not bool(torch.isfinite(actual).all()):
            failures.append(f"{name} not finite")
            continue
        error, bound = parity_bound(actual, oracle, baseline)
        if error > bound:
            failures.append(f"{name} error {error:.2e} > {bound:.2e}")
    if grad.dtype != pred.dtype:
        failures.append(f"grad dtype {grad.dtype} != pred dtype {pred.dtype}")
    detail = "; ".join(failures) if failures else "within tolerance"
    return Outcome(case.op, backend, "parity", str(dtype).replace("torch.", ""), case.shape, not failures, detail)


def _check_gradcheck(case: Case, backend: str, device: str, seed: int) -> Outcome:
    pred, call = case.build(torch.float64, device, torch.Generator().manual_seed(seed))
    leaf = pred.detach().requires_grad_()
    try:
        passed = torch.autograd.gradcheck(lambda p: call(p, backend), (leaf,), eps=1e-6, atol=1e-5, rtol=1e-4)
        detail = "analytical == numerical"
    except RuntimeError as error:  # gradcheck raises with the mismatching Jacobians
        passed, detail = False, str(error).splitlines()[0][:120]
    return Outcome(case.op, backend, "gradcheck", "float64", case.shape, bool(passed), detail)


def run(
    device: str,
    backends: Optional[List[str]] = None,
    dtypes: Optional[List[torch.dtype]] = None,
    seed: int = 0,
    progress: Optional[Callable[[Outcome], None]] = None,
) -> List[Outcome]:
    """All checks on `device`; `backends` defaults to every non-reference backend available."""
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    outcomes = []
    for case in cases():
        available = [b for b in available_backends(device, case.operator) if b != "reference"]
        for backend in available if backends is None else [b for b in backends if b in available]:
            checks = [lambda: _check_gradcheck(case, backend, device, seed)] if case.gradcheck else []
            checks += [lambda dtype=dtype: _check_parity(case, backend, dtype, device, seed) for dtype in dtypes]
            for check in checks:
                outcome = check()
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
    return outcomes


def format_table(outcomes: List[Outcome]) -> str:
    header = ("op", "backend", "check", "dtype", "input", "result", "detail")
    rows = [header] + [
        (o.op, o.backend, o.check, o.dtype, o.shape, "pass" if o.passed else "FAIL", o.detail) for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfl_ops verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backends", nargs="+", choices=KERNEL_BACKENDS, help="default: every backend available on the device"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    available = available_backends(args.device)
    unavailable = sorted(set(args.backends or ()) - set(available))
    if unavailable:
        parser.error(
            f"argument --backends: {', '.join(unavailable)} not available on {args.device} "
            f"(available: {', '.join(available)})"
        )
    print(f"gfl_ops verify on {args.device}: backends {available}", flush=True)
    outcomes = run(
        args.device,
        args.backends,
        seed=args.seed,
        progress=lambda o: print("." if o.passed else "F", end="", flush=True, file=sys.stderr),
    )
    print(file=sys.stderr)
    print(format_table(outcomes))
    failed = sum(not o.passed for o in outcomes)
    if not outcomes:
        print("no backend besides the reference is available on this device: nothing verified")
        return 1
    print(f"{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0
