"""Shared helpers of the gfl_ops test suite: input builders, layouts and the parity check.

Tolerances follow the flash-attention tests: the error of the native backend (or of the
Triton backend, in test_triton_backend.py) against the float64 reference may be at most
FACTOR times the error of the reference itself evaluated in the tested dtype, plus a tiny
atol. In detail, for an output `actual` of dtype d:

    err      = max |actual - ref64|
    ref_err  = max |ref_d - ref64|          ref_d: the reference run on the same d inputs,
               or the float64 reference on inputs moved by a couple of units in the last
               place of the computation, if larger (conditioning; see check_parity; for
               float64 pred the only baseline)
    rounding = max |ref64.to(d) - ref64|    the unavoidable error of an output in dtype d
    atol     = 2 eps(d) * max |ref64|       two units of d at the output's scale
               (+ 64 eps(float64) * max |ref64| for float64, where ref_d IS ref64)
    assert err <= FACTOR * max(ref_err, rounding) + atol

The atol matters for tiny tensors only: with one or two elements the reference can be
exact by luck while the kernel's gradient, rounded once in the kernel and once more when
scaled by the incoming gradient, is off by a unit or two.

The reference computes half inputs in float32 and rounds its gradient to pred's dtype once,
so for float16/bfloat16 `ref_err` of a gradient is about its rounding error.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
FACTOR = 3.0

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available on this machine (no GPU)"
)
DEVICES = (pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_generator(*key) -> torch.Generator:
    """A CPU generator seeded from the test's parameters, so each case draws its own values."""
    seed = 0
    for part in key:
        for ch in str(part):
            seed = (seed * 131 + ord(ch)) % (2**31 - 1)
    return torch.Generator().manual_seed(seed)


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of t's dimensions is contiguous (the
    dimensions of size > 1, ordered by stride, each step the product of the sizes before)."""
    expected_stride = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


# --------------------------------------------------------------------------------------
# Layouts of a (N, C) / (B, C, H, W) class tensor
# --------------------------------------------------------------------------------------

CLASS_LAYOUTS = ("contiguous", "nchw", "channels_last", "sliced", "transposed")
FOUR_D_LAYOUTS = ("nchw", "channels_last")

# (layout, anchors, num_classes): anchors is N for 2-D layouts, (B, H, W) for 4-D ones.
CLASS_CASES = [
    ("contiguous", 1, 1),
    ("contiguous", 7, 3),
    ("contiguous", 13, 80),
    ("contiguous", 3, 1203),
    ("nchw", (1, 2, 2), 1203),
    ("nchw", (2, 3, 5), 3),
    ("nchw", (1, 2, 3), 80),
    ("nchw", (2, 1, 7), 1),
    ("channels_last", (2, 3, 5), 3),
    ("channels_last", (1, 2, 3), 80),
    ("channels_last", (2, 1, 7), 13),
    ("sliced", 7, 3),
    ("sliced", 13, 80),
    ("sliced", 1, 1),
    ("transposed", 7, 3),
    ("transposed", 13, 80),
    ("transposed", 1, 1),
]


# The channel-first walk of the CPU kernel reads (B, C, H, W) and (C, N).t() in place.
PLANE_LAYOUTS = ("nchw", "transposed")


def class_params(cases=None, dtypes=FLOAT_DTYPES):
    """pytest params (dtype, case) over the class layouts."""
    return [
        pytest.param(dtype, case, id=f"{dtype_id(dtype)}-{class_case_id(case)}")
        for dtype in dtypes
        for case in (cases or CLASS_CASES)
    ]


def class_case_id(case) -> str:
    layout, anchors, classes = case
    anchors = "x".join(map(str, anchors)) if isinstance(anchors, tuple) else str(anchors)
    return f"{layout}-A{anchors}-C{classes}"


def apply_class_layout(values: Callable[..., Tensor], layout: str, anchors, num_classes: int) -> Tensor:
    """Builds a class tensor with `layout` from `values(*shape)` (a dense tensor of that shape)."""
    C = num_classes
    if layout == "contiguous":
        return values(anchors, C)
    if layout == "nchw":
        B, H, W = anchors
        return values(B, C, H, W)
    if layout == "channels_last":
        B, H, W = anchors
        return values(B, H, W, C).permute(0, 3, 1, 2)
    if layout == "sliced":
        return values(anchors, C + 5)[:, :C]
    if layout == "transposed":
        return values(C, anchors).t()
    raise AssertionError(layout)


def make_class_pred(
    layout: str,
    anchors,
    num_classes: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    *,
    activated: bool = False,
    scale: float = 3.0,
    prob_range: Optional[Tuple[float, float]] = None,
) -> Tensor:
    """Logits (or probabilities in (0, 1) if activated) with the given layout.

    Probabilities: sigmoid(logits) clamped to [0.01, 0.99], or mapped onto prob_range.
    """

    def values(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        if activated and prob_range is not None:
            x = prob_range[0] + (prob_range[1] - prob_range[0]) * torch.sigmoid(x)
        elif activated:
            x = torch.sigmoid(x).clamp(0.01, 0.99)
        return x.to(dtype).to(device)

    pred = apply_class_layout(values, layout, anchors, num_classes)
    if activated:
        assert bool(((pred > 0) & (pred < 1)).all())
    return pred


def anchor_shape(pred: Tensor) -> Tuple[int, ...]:
    return (pred.shape[0],) + tuple(pred.shape[2:])


BACKGROUND_VALUES = (-1, -100, 10**6)


def make_labels(shape, num_classes: int, gen: torch.Generator, device: str, positive_fraction=0.5) -> Tensor:
    """int64 labels: positives in [0, C), the rest background: C, -1 and other out-of-range values."""
    numel = int(math.prod(shape))
    positive = torch.randint(0, num_classes, (numel,), generator=gen)
    background_choices = torch.tensor((num_classes,) + BACKGROUND_VALUES)
    background = background_choices[torch.randint(0, len(background_choices), (numel,), generator=gen)]
    is_positive = torch.rand(numel, generator=gen) < positive_fraction
    labels = torch.where(is_positive, positive, background)
    return labels.view(shape).to(device)


def make_scores(shape, dtype: torch.dtype, gen: torch.Generator, device: str) -> Tensor:
    """IoU scores in [0, 1]."""
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


D_MARGIN = 0.01


def away_from_probability(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft targets y > 0 moved 2 * D_MARGIN away from p where |p - y| < D_MARGIN.

    For beta < 2 the gradient holds |d|^(beta - 1) and |d|^(beta - 2) terms, d = sigma - y:
    near d = 0 the last-bit rounding of sigma becomes a large relative difference between
    any two float32 (or float64) implementations. Measured over 2e5 such elements, native
    and reference errors follow the same distribution there, but the largest error of a
    handful of elements is then a matter of luck, not of accuracy. The deterministic
    tests in test_parity_qfl.py keep their targets away too; gradcheck covers d near 0.
    """
    close = (y > 0) & ((p - y).abs() < D_MARGIN)
    shifted = torch.where(p < 0.5, p + 2 * D_MARGIN, p - 2 * D_MARGIN)
    return torch.where(close, shifted, y)


# --------------------------------------------------------------------------------------
# Rows of bins (DFL, integral)
# --------------------------------------------------------------------------------------

BIN_LAYOUTS = ("contiguous", "sliced", "transposed", "row_strided")
# (layout, rows, bins)
BIN_CASES = [
    ("contiguous", 1, 2),
    ("contiguous", 7, 3),
    ("contiguous", 13, 17),
    ("contiguous", 40, 8),
    ("sliced", 7, 17),
    ("sliced", 1, 2),
    ("transposed", 13, 17),
    ("transposed", 7, 2),
    ("row_strided", 7, 8),
]


def bin_case_id(case) -> str:
    layout, rows, bins = case
    return f"{layout}-M{rows}-K{bins}"


def make_bin_pred(layout: str, rows: int, bins: int, dtype, device, gen, scale: float = 2.0) -> Tensor:
    def values(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "contiguous":
        return values(rows, bins)
    if layout == "sliced":
        return values(rows, bins + 3)[:, 1 : bins + 1]
    if layout == "transposed":
        return values(bins, rows).t()
    if layout == "row_strided":
        return values(2 * rows, bins)[::2]
    raise AssertionError(layout)


def make_dfl_target(rows: int, bins: int, dtype, gen, device) -> Tensor:
    """Targets in [0, n] with the edge values 0, n, n - 0.1, integers and random values."""
    n = bins - 1
    target = torch.rand(rows, generator=gen, dtype=torch.float64) * n
    specials = torch.tensor([0.0, float(n), n - 0.1, float(n // 2), 1.0, n - 1e-3], dtype=torch.float64)
    count = min(rows // 2, len(specials))
    target[:count] = specials[:count].clamp(0, n)
    return target.to(dtype).to(device)


# --------------------------------------------------------------------------------------
# The parity check
# --------------------------------------------------------------------------------------


def upcast(value):
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.double()
    return value


def upstream_for(shape, device) -> Tensor:
    """A fixed random incoming gradient (float64) for an output of `shape`."""
    gen = torch.Generator().manual_seed(20240607)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(device)


def evaluate(fn: Callable[[Tensor], Tensor], pred: Tensor):
    """Output of fn(pred) and d sum(output * upstream) / d pred, the raw gradient of autograd."""
    leaf = pred.detach().requires_grad_()
    out = fn(leaf)
    upstream = upstream_for(out.shape, out.device)
    (grad,) = torch.autograd.grad((out.double() * upstream).sum(), leaf)
    return out.detach(), grad


def assert_parity(
    name: str,
    actual: Tensor,
    ref64: Tensor,
    baselines: Sequence[Tensor] = (),
    factor: float = FACTOR,
    term_scale: float = 0.0,
):
    """err(actual) <= factor * max(err(baselines), rounding) + atol, as documented at the top.

    baselines: the reference in the tested dtype, and the float64 reference on perturbed
    inputs (see check_parity); their largest error against ref64 is the reference's own.
    term_scale: the size of the terms a small result is the difference of (the integral's
    gradient softmax_k * (k - E) subtracts numbers up to n); the atol uses the larger of it
    and the result's own scale.
    """
    assert tuple(actual.shape) == tuple(ref64.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().double().cpu()
    e = ref64.detach().double().cpu()
    assert bool(torch.isfinite(e).all()), f"{name}: the float64 reference is not finite (a bad test input)"
    assert bool(torch.isfinite(a).all()), f"{name}: non-finite values {a[~torch.isfinite(a)][:4].tolist()}"
    err = (a - e).abs().max().item()
    ref_err = max([(b.detach().double().cpu() - e).abs().max().item() for b in baselines], default=0.0)
    rounding = (e.to(actual.dtype).double() - e).abs().max().item()
    scale = max(e.abs().max().item(), term_scale)
    atol = 2 * torch.finfo(actual.dtype).eps * scale
    if actual.dtype == torch.float64:
        atol += 64 * torch.finfo(torch.float64).eps * scale
    bound = factor * max(ref_err, rounding) + atol
    assert err <= bound, (
        f"{name}: native error {err:.3e} > bound {bound:.3e} "
        f"(reference's own error {ref_err:.3e}, rounding {rounding:.3e}, atol {atol:.3e}, "
        f"scale {scale:.3e}, dtype {actual.dtype})"
    )


def assert_parity_relative(name: str, actual: Tensor, ref64: Tensor, ref_low: Tensor, factor: float = FACTOR):
    """The criterion of assert_parity on relative errors, element by element: for values
    spanning many orders of magnitude, where the largest ones hide the rest from a maximum
    absolute error. Elements where the reference is 0 must be 0."""
    a = actual.detach().double().cpu().flatten()
    e = ref64.detach().double().cpu().flatten()
    low = ref_low.detach().double().cpu().flatten()
    zero = e == 0
    assert bool((a[zero] == 0).all()), f"{name}: non-zero where the reference is 0"
    a, e, low = a[~zero], e[~zero], low[~zero]
    err = ((a - e) / e).abs().max().item()
    ref_err = ((low - e) / e).abs().max().item()
    rounding = ((e.to(actual.dtype).double() - e) / e).abs().max().item()
    atol = 2 * torch.finfo(actual.dtype).eps + (
        64 * torch.finfo(torch.float64).eps if actual.dtype == torch.float64 else 0
    )
    bound = factor * max(ref_err, rounding) + atol
    assert err <= bound, (
        f"{name}: native relative error {err:.3e} > bound {bound:.3e} "
        f"(reference's own {ref_err:.3e}, rounding {rounding:.3e}, dtype {actual.dtype})"
    )


def perturbed_copies(pred: Tensor, inputs: Dict[str, object], seed: int = 99):
    """float64 pred and inputs moved by a couple of units in the last place of the
    computation's precision (float32 for half and float32 pred, float64 for float64):
    every element of pred by +-2 eps max(1, |pred|), random signs (a logit move of 2 eps
    moves sigma by up to one unit), the other floating inputs by a relative -eps
    (shrinking keeps targets inside [0, 1] and [0, n]). Probabilities stay inside (0, 1)."""
    eps = torch.finfo(accumulate_dtype(pred.dtype)).eps
    gen = torch.Generator().manual_seed(seed)
    p = pred.detach().double()
    signs = (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(p.device)
    moved = p + 2 * eps * p.abs().clamp_min(1.0) * signs
    moved = torch.where((p > 0) & (p < 1), moved.clamp(eps, 1 - eps), moved)

    def perturb(value):
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            return value
        return value.double() * (1 - eps)

    return moved, {k: perturb(v) for k, v in inputs.items()}


def check_parity(
    call: Callable[..., Tensor],
    pred: Tensor,
    inputs: Dict[str, object],
    *,
    out_dtype: torch.dtype,
    check_layout: bool = True,
    grad: bool = True,
    grad_term_scale: float = 0.0,
    backend: str = "native",
):
    """Runs call(pred, backend=..., **inputs) with backend="native" on pred and compares its
    value and gradient with the oracle, backend="reference" on float64 copies of pred and
    of every floating-point input.

    The reference's own error (the baseline of the tolerance) is the larger of
    - the reference run on pred and inputs as they are (for half and float32 pred it
      computes in float32 and rounds its gradient to pred's dtype), and
    - the float64 reference on inputs perturbed by a couple of units in the last place of
      the computation (perturbed_copies): the error any backward-stable implementation
      may show where the maths is ill-conditioned, e.g. |d|^(beta - 1) for beta < 1 near
      d = sigma - y = 0, or a softmax gradient at DFL's minimum. For float64 pred it is the
      only baseline, the reference in float64 being the oracle itself.

    grad_term_scale: see assert_parity's term_scale; multiplied by the incoming gradient.
    backend: the backend under test, "native" unless a test of the Triton kernels says so.
    """
    native = lambda p: call(p, backend=backend, **inputs)  # noqa: E731
    low = lambda p: call(p, backend="reference", **inputs)  # noqa: E731
    inputs64 = {k: upcast(v) for k, v in inputs.items()}
    oracle = lambda p: call(p, backend="reference", **inputs64)  # noqa: E731
    pred_moved, inputs_moved = perturbed_copies(pred, inputs)
    moved = lambda p: call(p, backend="reference", **inputs_moved)  # noqa: E731
    if not grad:
        with torch.no_grad():
            out_n, out_l, out_r, out_m = native(pred), low(pred), oracle(pred.double()), moved(pred_moved)
        assert out_n.dtype == out_dtype, f"output dtype {out_n.dtype}, expected {out_dtype}"
        assert_parity("value", out_n, out_r, [out_l, out_m])
        return out_n
    out_n, grad_n = evaluate(native, pred)
    out_l, grad_l = evaluate(low, pred)
    out_r, grad_r = evaluate(oracle, pred.double())
    out_m, grad_m = evaluate(moved, pred_moved)
    assert out_n.dtype == out_dtype, f"output dtype {out_n.dtype}, expected {out_dtype}"
    assert_parity("value", out_n, out_r, [out_l, out_m])
    assert grad_n.dtype == pred.dtype, f"gradient dtype {grad_n.dtype}, pred dtype {pred.dtype}"
    assert grad_n.device == pred.device
    assert tuple(grad_n.shape) == tuple(pred.shape)
    if check_layout and is_dense(pred):
        assert grad_n.stride() == pred.stride(), f"gradient strides {grad_n.stride()} != pred's {pred.stride()}"
    # The same through .backward(): pred.grad, pred's dtype (and layout, via AccumulateGrad).
    leaf = pred.detach().requires_grad_()
    out = native(leaf)
    (out.double() * upstream_for(out.shape, out.device)).sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == pred.dtype
    assert torch.equal(leaf.grad, grad_n), "pred.grad differs from the gradient autograd.grad returned"
    if check_layout and is_dense(pred):
        assert leaf.grad.stride() == pred.stride()
    term_scale = grad_term_scale * upstream_for(out_n.shape, "cpu").abs().max().item() if out_n.numel() else 0.0
    assert_parity("gradient", grad_n, grad_r, [grad_l, grad_m], term_scale=term_scale)
    return out_n, grad_n


# --------------------------------------------------------------------------------------
# Weighting / avg_factor variants
# --------------------------------------------------------------------------------------

WEIGHTINGS = ("plain", "weight", "avg_float", "avg_tensor", "weight_avg_tensor", "weight_avg_float")


def reduction_params(weightings=WEIGHTINGS, reductions=("none", "mean", "sum")):
    """pytest params (dtype, reduction, weighting) over FLOAT_DTYPES, without "sum" with an
    avg_factor (an error, tested in test_errors.py)."""
    return [
        pytest.param(dtype, reduction, weighting, id=f"{dtype_id(dtype)}-{reduction}-{weighting}")
        for dtype in FLOAT_DTYPES
        for reduction in reductions
        for weighting in weightings
        if not (reduction == "sum" and "avg" in weighting)
    ]


def weighting_kwargs(weighting: str, reduction: str, loss_shape, loss_dtype, gen, device) -> Optional[dict]:
    """weight / avg_factor keyword arguments; None for combinations that are invalid ('sum' + avg)."""
    kwargs: Dict[str, object] = {"reduction": reduction}
    if "avg" in weighting and reduction == "sum":
        return None
    if "weight" in weighting:
        kwargs["weight"] = (torch.rand(loss_shape, generator=gen, dtype=torch.float64) * 2).to(loss_dtype).to(device)
    if weighting.endswith("avg_float"):
        kwargs["avg_factor"] = 3.7
    elif weighting.endswith("avg_tensor"):
        kwargs["avg_factor"] = torch.tensor(5.3, dtype=loss_dtype, device=device)
    return kwargs
