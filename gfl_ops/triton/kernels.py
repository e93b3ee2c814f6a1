"""Triton kernels for the classification losses (QFL, focal, varifocal), Distribution Focal
Loss and the integral.

The same equations as csrc/gfl_math.h, under the same names, so the two read side by side
(derivations: docs/MATH.md). Each kernel makes one pass over pred: it computes the loss per
anchor (row), or the sum of a program's losses, and, when NEED_GRAD, the gradient of each
loss with respect to pred times the anchor's weight (which autograd's backward pass sets to
weight * d total / d loss: csrc/gfl_autograd.cpp). Maths in float32 for float16/bfloat16 inputs
(float64 for float64); sums over classes, bins and a program's anchors run in a fixed
order, so results are reproducible bit for bit.

A program owns BLOCK_ANCHORS anchors (rows) and walks their classes (bins) BLOCK_CLASSES
at a time: rows of C = 80 classes or 17 bins are short, so many rows share a program.
"""

import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------
# Per-element maths (gfl_math.h)
# ---------------------------------------------------------------------------------------


@triton.jit
def log1p_(t):
    """log1p(t) for t > -1, accurate in float32 and float64.

    log(u) * t / (u - 1) with u = 1 + t cancels the rounding of u (Goldberg); t where u
    rounds to 1. (gfl_math.h computes log1p_unit and log_one_minus with series on the host
    and log1pf on the device; Triton's libdevice.log1p would not run in the interpreter.)
    """
    u = 1.0 + t
    u_minus_one = u - 1.0
    return tl.where(u_minus_one == 0.0, t, tl.log(u) * (t / tl.where(u_minus_one == 0.0, 1.0, u_minus_one)))


@triton.jit
def log1p_unit(t):
    """log1p(t) for t in [0, 1], the range of exp(-|x|)."""
    return log1p_(t)


@triton.jit
def log_one_minus(p):
    """log(1 - p) = log1p(-p), accurate for small p (as torch's BCE)."""
    return log1p_(-p)


# gfl_math.h's Exponent: closed forms for 0, 1, 1.5 and 2, pow otherwise (constexpr globals,
# which jit functions may read).
EXPONENT_ZERO = tl.constexpr(0)
EXPONENT_ONE = tl.constexpr(1)
EXPONENT_ONE_AND_HALF = tl.constexpr(2)
EXPONENT_TWO = tl.constexpr(3)
EXPONENT_GENERAL = tl.constexpr(4)
# Its Modulation: QFL's weight, or the focal family's (focal, varifocal).
QUALITY = tl.constexpr(0)
FOCAL_FAMILY = tl.constexpr(1)


def exponent_kind(exponent: float) -> int:
    """gfl_math.h's exponent_kind."""
    closed_forms = {0.0: EXPONENT_ZERO, 1.0: EXPONENT_ONE, 1.5: EXPONENT_ONE_AND_HALF, 2.0: EXPONENT_TWO}
    return closed_forms.get(float(exponent), EXPONENT_GENERAL).value


@triton.jit
def power_of_magnitude(d, exponent, one_minus_magnitude, EXPONENT: tl.constexpr):
    """|d|^e and its derivative e |d|^(e - 1) sign(d) = e |d|^e / d, taken as 0 at d = 0;
    0^e is 1 for e = 0 (as torch.pow) and 0 otherwise. A general exponent takes |d|^e above
    |d| = 1/2 as exp(e log1p(-(1 - |d|))), from the caller's 1 - |d| without d's rounding
    (gfl_math.h's power_of_magnitude: at a large e, that rounding is all of the result)."""
    magnitude = tl.abs(d)
    sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    if EXPONENT == EXPONENT_ZERO:
        value = tl.full(d.shape, 1.0, d.dtype)
        derivative = tl.zeros(d.shape, d.dtype)
    elif EXPONENT == EXPONENT_ONE:
        value = magnitude
        derivative = sign
    elif EXPONENT == EXPONENT_ONE_AND_HALF:
        root = tl.sqrt(magnitude)
        value = magnitude * root
        derivative = 1.5 * root * sign
    elif EXPONENT == EXPONENT_TWO:
        value = d * d
        derivative = 2.0 * d
    else:
        is_zero = magnitude == 0.0
        # In float64: in float32 the rounding of e * log|d| would reach the result
        # (gfl_math.h's pow_ carries that exponent in two floats instead). One log: of |d|,
        # or above 1/2 of 1 - r, exact in float64 for a float32 r >= 2^-30 (its digits fit);
        # below that log1p(-r) = -r within 2^-31 relative (the next term is r^2 / 2), far
        # below float32's rounding. (A second log, log1p's, cost registers.)
        rest = one_minus_magnitude.to(tl.float64)
        near_one = magnitude > 0.5
        log_argument = tl.where(near_one, 1.0 - rest, tl.where(is_zero, 1.0, magnitude).to(tl.float64))
        log_magnitude = tl.where(near_one & (rest < 9.313225746154785e-10), -rest, tl.log(log_argument))
        power = tl.exp(exponent * log_magnitude).to(d.dtype)
        value = tl.where(is_zero, tl.where(exponent == 0.0, 1.0, 0.0), power)
        derivative = tl.where(is_zero, 0.0, exponent * (value / tl.where(is_zero, 1.0, d)))
    return value, derivative


@triton.jit
def bce_of_logit(x, t):
    """BCE(x, t) = (1 - t) x + softplus(-x), softplus(-x) = max(-x, 0) + log1p(exp(-|x|));
    returns BCE, p = sigma(x), 1 - p (without the subtraction's rounding), dBCE/dx = sigma - t
    and dp/dx = sigma (1 - sigma)."""
    e = tl.exp(-tl.abs(x))
    softplus_neg_x = tl.maximum(-x, 0.0) + log1p_unit(e)
    inv_one_plus_e = 1.0 / (1.0 + e)
    sigma = tl.where(x >= 0.0, inv_one_plus_e, e * inv_one_plus_e)
    complement = tl.where(x >= 0.0, e * inv_one_plus_e, inv_one_plus_e)
    return (1.0 - t) * x + softplus_neg_x, sigma, complement, sigma - t, e * inv_one_plus_e * inv_one_plus_e


@triton.jit
def bce_of_probability(p, t):
    """BCE_p = -(t max(log p, -100) + (1 - t) max(log1p(-p), -100));
    returns BCE_p, p, 1 - p, dBCE_p/dp = (p - t) / max(p (1 - p), 1e-12) (torch's backward
    formula; NaN outside [0, 1], the reference's rule) and dp/dp = 1."""
    log_p = tl.log(p)
    log_one_minus_p = log_one_minus(p)
    clamped_log_p = tl.where(log_p < -100.0, -100.0, log_p)  # keeps NaN
    clamped_log_one_minus_p = tl.where(log_one_minus_p < -100.0, -100.0, log_one_minus_p)
    bce = -(t * clamped_log_p + (1.0 - t) * clamped_log_one_minus_p)
    variance = p * (1.0 - p)
    dbce = tl.where((p >= 0.0) & (p <= 1.0), (p - t) / tl.where(variance < 1e-12, 1e-12, variance), float("nan"))
    return bce, p, 1.0 - p, dbce, tl.full(p.shape, 1.0, p.dtype)


@triton.jit
def one_minus_magnitude(m, p, complement, t, focal_base):
    """1 - |m| without cancellation (gfl_math.h's one_minus_magnitude): 1 - p_t for
    focal_base 1; (1 - p) + t where m = p - t >= 0 and p + (1 - t) below, for focal_base 0."""
    focal_t = focal_base * t
    return tl.where(m >= 0.0, complement * (1.0 - focal_t) + p * focal_t + (1.0 - focal_base) * t, p + (1.0 - t))


@triton.jit
def modulating_weight(
    p,
    complement,
    t,
    positive,
    exponent,
    alpha_positive,
    alpha_negative,
    focal_base,
    iou_weighted,
    MODULATION: tl.constexpr,
    EXPONENT: tl.constexpr,
    WEIGHTS_POSITIVES: tl.constexpr,
):
    """w and dw/dp. QFL: |p - t|^beta. The focal family (gfl_math.h's ModulationParams):
    m = p (1 - f t) + (1 - p) f t + (f - 1) t with f = focal_base: 1 - p_t (dm/dp = 1 - 2t)
    for f = 1, p - t (dm/dp = 1) for f = 0;
    alpha_t = alpha_positive t + alpha_negative (1 - t); w = (iou_weighted ? t : 1) on
    positives when WEIGHTS_POSITIVES (dw/dp = 0 there), alpha_t |m|^gamma on every other
    element."""
    if MODULATION == QUALITY:
        d = p - t
        weight, dweight = power_of_magnitude(d, exponent, one_minus_magnitude(d, p, complement, t, 0.0), EXPONENT)
    else:
        focal_t = focal_base * t
        m = p * (1.0 - focal_t) + complement * focal_t + (focal_base - 1.0) * t
        slope = 1.0 - 2.0 * focal_t
        power, dpower = power_of_magnitude(m, exponent, one_minus_magnitude(m, p, complement, t, focal_base), EXPONENT)
        alpha_t = alpha_positive * t + alpha_negative * (1.0 - t)
        weight = alpha_t * power
        dweight = alpha_t * dpower * slope
        if WEIGHTS_POSITIVES:
            weight = tl.where(positive, iou_weighted * t + (1.0 - iou_weighted), weight)
            dweight = tl.where(positive, 0.0, dweight)
    return weight, dweight


@triton.jit
def class_element(
    pred,
    t,
    positive,
    exponent,
    alpha_positive,
    alpha_negative,
    focal_base,
    iou_weighted,
    MODULATION: tl.constexpr,
    EXPONENT: tl.constexpr,
    WEIGHTS_POSITIVES: tl.constexpr,
    DETACH_WEIGHT: tl.constexpr,
    ACTIVATED: tl.constexpr,
):
    """w * BCE and d/dinput = w dBCE/dinput + BCE dw/dp dp/dinput, the second term left out
    where w is a constant by definition (an exponent of 0, a detached weight; gfl_math.h's
    ModulatingWeight): autograd has no such term, and an infinite logit's infinite BCE must
    not make its 0 NaN. Both are compile-time here. A weighted positive's constant weight
    has dw/dp = 0 instead (modulating_weight), so an infinite logit on a varifocal positive
    still gives NaN on this backend: leaving its term out takes a select of BCE or of the
    term, and each placement tried made a varifocal variant spill under Triton 3.6 (sm_80,
    128 registers)."""
    if ACTIVATED:
        bce, p, complement, dbce, dp = bce_of_probability(pred, t)
    else:
        bce, p, complement, dbce, dp = bce_of_logit(pred, t)
    weight, dweight = modulating_weight(
        p,
        complement,
        t,
        positive,
        exponent,
        alpha_positive,
        alpha_negative,
        focal_base,
        iou_weighted,
        MODULATION,
        EXPONENT,
        WEIGHTS_POSITIVES,
    )
    if EXPONENT == EXPONENT_ZERO or DETACH_WEIGHT:
        return weight * bce, weight * dbce
    return weight * bce, weight * dbce + bce * dweight * dp


@triton.jit
def label_target(classes, labels, scores):
    """The score on the labelled class, 0 elsewhere; labels outside [0, C) match no class."""
    return tl.where(labels[:, None] == classes[None, :], scores[:, None], 0.0)


@triton.jit
def dfl_bins(target, num_bins):
    """i = min(floor(y), n - 1), w_l = (i + 1) - y, w_r = 1 - w_l, y clamped into [0, n] (NaN -> 0)."""
    last_bin = (num_bins - 1).to(target.dtype)
    y = tl.where(target > 0.0, target, 0.0)
    y = tl.where(y < last_bin, y, last_bin)
    left = tl.minimum(y.to(tl.int32), num_bins - 2)
    weight_left = (left + 1).to(y.dtype) - y
    return left, weight_left, 1.0 - weight_left


@triton.jit
def dfl_loss(row_max, sum_exp, z_left, z_right, weight_left, weight_right):
    """log S - w_l (z_l - m) - w_r (z_r - m), m = max_k z_k, S = sum_k exp(z_k - m): relative
    to m, so that large logits lose nothing to the rounding of m + log S."""
    return tl.log(sum_exp) - weight_left * (z_left - row_max) - weight_right * (z_right - row_max)


@triton.jit
def dfl_grad(softmax, bins, left, weight_left, weight_right):
    """softmax_k - w_l [k == i] - w_r [k == i + 1]."""
    return (
        softmax
        - tl.where(bins[None, :] == left[:, None], weight_left[:, None], 0.0)
        - tl.where(bins[None, :] == left[:, None] + 1, weight_right[:, None], 0.0)
    )


@triton.jit
def integral_grad(softmax, bins, expectation):
    """dE/dz_k = softmax_k (k - E)."""
    return softmax * (bins[None, :].to(softmax.dtype) - expectation[:, None])


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def anchor_offsets(outer, inner, inner_stride, outer_sizes, outer_strides, NUM_OUTER_DIMS: tl.constexpr):
    """Element offsets of anchors (outer, inner) in one tensor: inner * inner_stride plus, for
    each outer dimension d (outermost first, row-major), its index times outer_strides[d]."""
    offsets = inner * inner_stride
    for d in tl.static_range(NUM_OUTER_DIMS - 1, -1, -1):
        offsets += (outer % outer_sizes[d]) * outer_strides[d]
        outer = outer // outer_sizes[d]
    return offsets


@triton.jit
def store_loss(loss_ptr, anchors, anchor_mask, loss, SUM: tl.constexpr):
    """The loss of a program's anchors: one per anchor, or (SUM) their sum, one per program,
    added up in a fixed order (the launcher adds up the programs' sums)."""
    if SUM:
        tl.store(loss_ptr + tl.program_id(0), tl.sum(tl.where(anchor_mask, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + anchors, loss, mask=anchor_mask)


@triton.jit
def class_kernel(
    pred_ptr,
    grad_ptr,
    loss_ptr,
    label_ptr,
    score_ptr,
    target_ptr,
    weight_ptr,
    class_weight_ptr,
    element_weight_ptr,
    element_loss_ptr,
    num_anchors,
    num_classes,
    inner_size,
    outer_sizes,
    pred_class_stride,
    pred_inner_stride,
    pred_outer_strides,
    grad_class_stride,
    grad_inner_stride,
    grad_outer_strides,
    target_class_stride,
    target_inner_stride,
    target_outer_strides,
    element_weight_class_stride,
    element_weight_inner_stride,
    element_weight_outer_strides,
    element_loss_class_stride,
    element_loss_inner_stride,
    element_loss_outer_strides,
    exponent,
    alpha_positive,
    alpha_negative,
    focal_base,
    iou_weighted,
    ACC_DTYPE: tl.constexpr,
    MODULATION: tl.constexpr,
    EXPONENT: tl.constexpr,
    WEIGHTS_POSITIVES: tl.constexpr,
    DETACH_WEIGHT: tl.constexpr,
    DENSE_TARGET: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_ELEMENT_WEIGHT: tl.constexpr,
    STORE_ELEMENT_LOSS: tl.constexpr,
    ACTIVATED: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SUM: tl.constexpr,
    NUM_OUTER_DIMS: tl.constexpr,
    BLOCK_ANCHORS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    """QFL, focal and varifocal. Anchors are (outer, inner) pairs of the coalesced anchor
    layout (csrc/gfl_anchor_layout.h's AnchorLayout): anchor a = outer * inner_size + inner sits at
    anchor_offsets(...) in each tensor, its class c a further c * class_stride, so (N, C)
    rows, (B, C, H, W) planes and sliced maps are all read in place. The loss of an anchor is
    weight * sum_c class_weight[c] * element_weight * loss_c; STORE_ELEMENT_LOSS writes each
    term (the elementwise losses' reduction "none")."""
    acc_t: tl.constexpr = ACC_DTYPE
    anchors = tl.program_id(0).to(tl.int64) * BLOCK_ANCHORS + tl.arange(0, BLOCK_ANCHORS)
    anchor_mask = anchors < num_anchors
    outer = anchors // inner_size
    inner = anchors % inner_size
    pred_rows = anchor_offsets(outer, inner, pred_inner_stride, outer_sizes, pred_outer_strides, NUM_OUTER_DIMS)
    grad_rows = anchor_offsets(outer, inner, grad_inner_stride, outer_sizes, grad_outer_strides, NUM_OUTER_DIMS)
    target_rows = anchor_offsets(outer, inner, target_inner_stride, outer_sizes, target_outer_strides, NUM_OUTER_DIMS)
    weight_rows = anchor_offsets(
        outer, inner, element_weight_inner_stride, outer_sizes, element_weight_outer_strides, NUM_OUTER_DIMS
    )
    loss_rows = anchor_offsets(
        outer, inner, element_loss_inner_stride, outer_sizes, element_loss_outer_strides, NUM_OUTER_DIMS
    )
    if not DENSE_TARGET:
        labels = tl.load(label_ptr + anchors, mask=anchor_mask, other=-1)
        if HAS_SCORES:
            scores = tl.load(score_ptr + anchors, mask=anchor_mask, other=0.0).to(acc_t)
        else:  # labels alone (focal): a score of 1
            scores = tl.full([BLOCK_ANCHORS], 1.0, dtype=acc_t)
    if HAS_WEIGHT:
        weights = tl.load(weight_ptr + anchors, mask=anchor_mask, other=0.0).to(acc_t)
    else:
        weights = tl.full([BLOCK_ANCHORS], 1.0, dtype=acc_t)
    row_loss = tl.zeros([BLOCK_ANCHORS], dtype=acc_t)
    # A while loop rather than range(0, num_classes, BLOCK_CLASSES): Triton 3.6's
    # interpreter converts a range bound with int() of a one-element array, which numpy 2.4
    # refuses; a comparison's truth value works on every version. The compiled loop is the
    # same (class_start stays a multiple of BLOCK_CLASSES, so the loads keep their width).
    class_start = 0
    while class_start < num_classes:
        classes = (class_start + tl.arange(0, BLOCK_CLASSES)).to(tl.int64)  # 64-bit offsets
        class_mask = classes < num_classes
        mask = anchor_mask[:, None] & class_mask[None, :]
        x = tl.load(pred_ptr + pred_rows[:, None] + classes[None, :] * pred_class_stride, mask=mask, other=0.5)
        if DENSE_TARGET:
            t = tl.load(
                target_ptr + target_rows[:, None] + classes[None, :] * target_class_stride, mask=mask, other=0.0
            )
            t = t.to(acc_t)
            positive = t > 0.0
        else:
            t = label_target(classes, labels, scores).to(acc_t)
            positive = labels[:, None] == classes[None, :]
        loss, grad = class_element(
            x.to(acc_t),
            t,
            positive,
            exponent,
            alpha_positive,
            alpha_negative,
            focal_base,
            iou_weighted,
            MODULATION,
            EXPONENT,
            WEIGHTS_POSITIVES,
            DETACH_WEIGHT,
            ACTIVATED,
        )
        scale = tl.full([1, BLOCK_CLASSES], 1.0, dtype=acc_t)
        if HAS_CLASS_WEIGHT:
            scale = tl.load(class_weight_ptr + classes, mask=class_mask, other=0.0).to(acc_t)[None, :]
        if HAS_ELEMENT_WEIGHT:
            element_weights = tl.load(
                element_weight_ptr + weight_rows[:, None] + classes[None, :] * element_weight_class_stride,
                mask=mask,
                other=0.0,
            )
            scale = scale * element_weights.to(acc_t)
        loss = scale * loss
        row_loss += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        if STORE_ELEMENT_LOSS:
            tl.store(
                element_loss_ptr + loss_rows[:, None] + classes[None, :] * element_loss_class_stride,
                weights[:, None] * loss,
                mask=mask,
            )
        if NEED_GRAD:
            grad_offsets = grad_rows[:, None] + classes[None, :] * grad_class_stride
            tl.store(
                grad_ptr + grad_offsets, (weights[:, None] * scale * grad).to(grad_ptr.dtype.element_ty), mask=mask
            )
        class_start += BLOCK_CLASSES
    if not STORE_ELEMENT_LOSS:
        store_loss(loss_ptr, anchors, anchor_mask, weights * row_loss, SUM)


@triton.jit
def row_softmax(
    pred_ptr, rows, row_mask, num_bins, pred_row_stride, pred_bin_stride, acc_t: tl.constexpr, BLOCK_BINS: tl.constexpr
):
    """A block of rows' logits, exp(z - max) and sum_k exp(z_k - max); padding bins hold -inf."""
    bins = tl.arange(0, BLOCK_BINS).to(tl.int64)  # 64-bit offsets
    mask = row_mask[:, None] & (bins < num_bins)[None, :]
    offsets = rows[:, None] * pred_row_stride + bins[None, :] * pred_bin_stride
    z = tl.load(pred_ptr + offsets, mask=mask, other=float("-inf")).to(acc_t)
    z = tl.where(row_mask[:, None], z, 0.0)  # rows past the end: finite, never stored
    row_max = tl.max(z, axis=1)
    shifted = tl.exp(z - row_max[:, None])
    return bins, mask, z, row_max, shifted, tl.sum(shifted, axis=1)


@triton.jit
def dfl_kernel(
    pred_ptr,
    grad_ptr,
    loss_ptr,
    target_ptr,
    weight_ptr,
    num_rows,
    num_bins,
    pred_row_stride,
    pred_bin_stride,
    grad_row_stride,
    grad_bin_stride,
    ACC_DTYPE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SUM: tl.constexpr,
):
    acc_t: tl.constexpr = ACC_DTYPE
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    bins, mask, z, row_max, shifted, sum_exp = row_softmax(
        pred_ptr, rows, row_mask, num_bins, pred_row_stride, pred_bin_stride, acc_t, BLOCK_BINS
    )
    target = tl.load(target_ptr + rows, mask=row_mask, other=0.0).to(acc_t)
    left, weight_left, weight_right = dfl_bins(target, num_bins)
    z_left = tl.sum(tl.where(bins[None, :] == left[:, None], z, 0.0), axis=1)
    z_right = tl.sum(tl.where(bins[None, :] == left[:, None] + 1, z, 0.0), axis=1)
    if HAS_WEIGHT:  # loss = weight * DFL, and its gradient
        weights = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(acc_t)
    else:
        weights = tl.full([BLOCK_ROWS], 1.0, dtype=acc_t)
    loss = dfl_loss(row_max, sum_exp, z_left, z_right, weight_left, weight_right)
    store_loss(loss_ptr, rows, row_mask, weights * loss, SUM)
    if NEED_GRAD:
        grad = weights[:, None] * dfl_grad(shifted / sum_exp[:, None], bins, left, weight_left, weight_right)
        offsets = rows[:, None] * grad_row_stride + bins[None, :] * grad_bin_stride
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def integral_kernel(
    pred_ptr,
    grad_ptr,
    value_ptr,
    grad_scale_ptr,
    num_rows,
    num_bins,
    pred_row_stride,
    pred_bin_stride,
    grad_row_stride,
    grad_bin_stride,
    ACC_DTYPE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    acc_t: tl.constexpr = ACC_DTYPE
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    bins, mask, z, row_max, shifted, sum_exp = row_softmax(
        pred_ptr, rows, row_mask, num_bins, pred_row_stride, pred_bin_stride, acc_t, BLOCK_BINS
    )
    softmax = shifted / sum_exp[:, None]
    expectation = tl.sum(softmax * bins[None, :].to(acc_t), axis=1)  # E = sum_k softmax_k k
    tl.store(value_ptr + rows, expectation.to(value_ptr.dtype.element_ty), mask=row_mask)
    if NEED_GRAD:
        grad = integral_grad(softmax, bins, expectation)
        if HAS_GRAD_SCALE:  # scaled before it is rounded to pred's dtype
            grad *= tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(acc_t)[:, None]
        offsets = rows[:, None] * grad_row_stride + bins[None, :] * grad_bin_stride
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
