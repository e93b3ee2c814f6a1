"""Generalized Focal Loss in plain PyTorch: the oracle every kernel is tested against.

Branch-free (no nonzero, no .item(), no host sync), differentiable by autograd, written
straight from the equations of docs/MATH.md. Half inputs are computed in float32; losses
come back in float32 (float64 for float64 inputs).

Where the kernels fix a convention, the reference states it in the same terms (docs/MATH.md):
the modulating factor's derivative is 0 at d = 0, labels of any integer dtype mean what
label.long() means, and the BCE of probabilities is torch's binary_cross_entropy (its -100
log clamp, its backward formula) without its check that inputs and targets lie in [0, 1].

The `*_per_anchor` / `*_per_row` / `*_elementwise` functions return unreduced losses; the
public-style functions below them add weight and reduction exactly as the fast backends do.
Beside QFL and DFL, the family of BCE(x, t) * w losses (sigmoid focal, varifocal) is written
here for the kernels to be tested against.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._reduction import accumulate_dtype, elementwise_weight, weight_reduce_loss


def dense_target_from_labels(pred: Tensor, label: Tensor, score: Tensor) -> Tensor:
    """The (N, C) / (B, C, d...) QFL target: score on the labelled class, 0 elsewhere.

    A label outside [0, C) (background: C, -1, ...) matches no class. Labels of any integer
    dtype are read as label.long(), as the functional API hands them to the kernels (torch
    compares neither uint16, uint32 nor uint64 with int64).
    """
    is_positive = label_mask(pred, label)
    return torch.where(is_positive, score.unsqueeze(1).to(accumulate_dtype(pred.dtype)), 0.0)


def label_mask(pred: Tensor, label: Tensor) -> Tensor:
    """The boolean one-hot of label over pred's classes (dim 1): label.long() == c, so a label
    outside [0, C) gives a row of False (mmdetection's one-hot over C + 1 columns, the last
    one dropped)."""
    num_classes = pred.shape[1]
    classes = torch.arange(num_classes, device=pred.device).view(_class_shape(pred))
    return label.long().unsqueeze(1) == classes


def _class_shape(pred: Tensor) -> tuple:
    """(1, C, 1, ...): a (C,) tensor viewed so that it broadcasts over pred's class dim 1."""
    return (1, pred.shape[1]) + (1,) * (pred.dim() - 2)


def _weighted_by_class(loss: Tensor, class_weight: Optional[Tensor]) -> Tensor:
    """loss[:, c, ...] * class_weight[c]; no operation at all without class_weight."""
    if class_weight is None:
        return loss
    return loss * class_weight.to(loss.dtype).view(_class_shape(loss))


class ProbabilityBCE(torch.autograd.Function):
    """BCE_p(p, y) = -(y * max(log p, -100) + (1 - y) * max(log1p(-p), -100)), elementwise.

    torch's F.binary_cross_entropy without its range check, so that every backend computes
    one formula: a probability outside [0, 1] gives NaN (the log of a negative number), a
    target outside [0, 1] the same formula extended. An autograd.Function because torch's
    gradients, which the kernels take too (csrc/gfl_math.h, qfl_probability_element), are
    not autograd of the clamped expression (NaN at p = 0 or 1, and a log held by its clamp
    would contribute nothing):

        dBCE_p/dp = (p - y) / max(p (1 - p), 1e-12)   in [0, 1], NaN outside
        dBCE_p/dy = log1p(-p) - log(p)

    (the 1e-12 in p's dtype, as the kernels: torch's own constant is float32's 1e-12). The
    backward is made of differentiable operations, so higher-order gradients work, and
    vmap (jacobian(vectorize=True)) and torch.compile(fullgraph=True) trace it. No custom
    jvp: torch.compile cannot trace one, so forward-mode AD is not available here.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(p: Tensor, y: Tensor) -> Tensor:
        return -(y * torch.log(p).clamp_min(-100) + (1 - y) * torch.log1p(-p).clamp_min(-100))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, y = ctx.saved_tensors
        grad_p = grad * _probability_bce_dp(p, y) if ctx.needs_input_grad[0] else None
        grad_y = grad * _probability_bce_dy(p) if ctx.needs_input_grad[1] else None
        return grad_p, grad_y


def _probability_bce_dp(p: Tensor, y: Tensor) -> Tensor:
    in_range = (p >= 0) & (p <= 1)
    return torch.where(in_range, (p - y) / (p * (1 - p)).clamp_min(1e-12), torch.nan)


def _probability_bce_dy(p: Tensor) -> Tensor:
    return torch.log1p(-p) - torch.log(p)


def modulating_factor(d: Tensor, beta: float) -> Tensor:
    """|d|^beta, with the kernels' conventions at d = 0: the value torch.pow(0, beta) (1 for
    beta = 0, 0 otherwise) and the derivative 0 for every beta.

    Autograd of d.abs().pow(beta) is beta * 0^(beta - 1) * sign(0) = inf * 0 = NaN at d = 0
    when beta < 1. Here pow runs on 1 where d = 0 (a finite derivative) and that term is
    multiplied by 0, so the gradient at d = 0 is 0 times the incoming one, as the kernels'
    BCE * dfactor (NaN only where the incoming gradient is NaN). The value at d = 0 is
    torch.pow of a zero tensor, not Python's 0.0 ** beta: with a symbolic beta
    (torch.compile(dynamic=True)), inductor's FX graph cache then served the graph of the
    first beta to every other beta.
    """
    magnitude = d.abs()
    is_zero = (magnitude == 0).to(d.dtype)
    factor_at_zero = magnitude.new_zeros(()).pow(beta)
    return (magnitude + is_zero).pow(beta) * (1 - is_zero) + factor_at_zero * is_zero


def quality_focal_loss_dense_per_anchor(
    pred: Tensor,
    target: Tensor,
    beta: float = 2.0,
    activated: bool = False,
    *,
    class_weight: Optional[Tensor] = None,
) -> Tensor:
    """sum over classes c of class_weight[c] * |sigma(x) - y|^beta * BCE(x, y); pred is p (not
    x) if activated; class_weight (C,) defaults to 1 (and is then not multiplied at all)."""
    dtype = accumulate_dtype(pred.dtype)
    x = pred.to(dtype)
    y = target.to(dtype)
    probability, bce = _probability_and_bce(x, y, activated)
    loss = modulating_factor(probability - y, beta) * bce
    return _weighted_by_class(loss, class_weight).sum(dim=1)


def quality_focal_loss_per_anchor(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    beta: float = 2.0,
    activated: bool = False,
    *,
    class_weight: Optional[Tensor] = None,
) -> Tensor:
    target = dense_target_from_labels(pred, label, score)
    return quality_focal_loss_dense_per_anchor(pred, target, beta, activated, class_weight=class_weight)


def _probability_and_bce(x: Tensor, t: Tensor, activated: bool):
    """(p, BCE) of one element: p = sigma(x) and BCE_with_logits(x, t) for logits; for
    probabilities (activated) p = x and ProbabilityBCE(p, t). x and t in acc_t already."""
    if activated:
        return x, ProbabilityBCE.apply(x, t)
    return torch.sigmoid(x), F.binary_cross_entropy_with_logits(x, t, reduction="none")


# --------------------------------------------------------------------------------------
# The family: BCE(x, t) * w per element (docs/MATH.md, "The family")
# --------------------------------------------------------------------------------------


def sigmoid_focal_loss_elementwise(
    pred: Tensor,
    target: Tensor,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    activated: bool = False,
    *,
    class_weight: Optional[Tensor] = None,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet) per element, of pred's shape, in acc_t:

        m       = p + t - 2 p t                  (= 1 - p_t,  p_t = p t + (1 - p)(1 - t))
        alpha_t = alpha t + (1 - alpha)(1 - t)   (1 if alpha is None or alpha < 0)
        loss    = BCE(x, t) * alpha_t * m^gamma  (* class_weight[c])

    m^gamma is modulating_factor(m, gamma) (derivative 0 at m = 0, as QFL's); the weight
    w = alpha_t m^gamma is not detached. target: labels of the anchor shape (pred's shape without dim 1; a label outside
    [0, C) is background, all t = 0), or a dense target of pred's shape (binary or soft, any
    dtype: torchvision; mmdetection's rule, pred.dim() == target.dim()).
    """
    dtype = accumulate_dtype(pred.dtype)
    x = pred.to(dtype)
    t = target.to(dtype) if target.dim() == pred.dim() else label_mask(pred, target).to(dtype)
    probability, bce = _probability_and_bce(x, t, activated)
    weight = modulating_factor(probability + t - 2 * probability * t, gamma)
    if alpha is not None and alpha >= 0:
        weight = weight * (alpha * t + (1 - alpha) * (1 - t))
    return _weighted_by_class(bce * weight, class_weight)


def varifocal_loss_elementwise(
    pred: Tensor,
    target: Tensor,
    score: Optional[Tensor] = None,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    detach_weight: bool = False,
    activated: bool = False,
    *,
    class_weight: Optional[Tensor] = None,
) -> Tensor:
    """Varifocal loss (VFNet) per element, of pred's shape, in acc_t:

        w    = t (1 if not iou_weighted)        on a positive element
             = alpha * |p - t|^gamma            on a negative one
        loss = BCE(x, t) * w  (* class_weight[c])

    Two target forms, which differ in what is positive:
    - score None: target is dense, of pred's shape (mmdetection): t = target, positive iff
      t > 0 (a score of 0 is a negative);
    - score given: target holds labels and score the scores, both of the anchor shape
      (RT-DETR, ultralytics, PP-YOLOE): the labelled class is positive whatever its score,
      t = score there and 0 elsewhere; a label outside [0, C) matches no class.
    |p - t|^gamma is modulating_factor(p - t, gamma). detach_weight=True: w is a constant
    (the official RT-DETR, D-FINE and DEIM criteria, a torch port of PP-YOLOE: no gradient
    through w); False: w is differentiated (mmdetection, ultralytics with its RT-DETR port,
    PP-YOLOE in Paddle).
    """
    dtype = accumulate_dtype(pred.dtype)
    x = pred.to(dtype)
    if score is None:
        t = target.to(dtype)
        is_positive = t > 0
    else:
        t = dense_target_from_labels(pred, target, score)
        is_positive = label_mask(pred, target)
    probability, bce = _probability_and_bce(x, t, activated)
    negative_weight = alpha * modulating_factor(probability - t, gamma)
    weight = torch.where(is_positive, t if iou_weighted else 1.0, negative_weight)
    if detach_weight:
        weight = weight.detach()
    return _weighted_by_class(bce * weight, class_weight)


def distribution_focal_loss_per_row(pred: Tensor, target: Tensor) -> Tensor:
    """lse(z) - w_l * z_i - w_r * z_{i+1} over the last dimension (bins), i = min(floor(y), n - 1);
    y is clamped to [0, n]. pred (..., n + 1), target (...) -> (...)."""
    dtype = accumulate_dtype(pred.dtype)
    z = pred.to(dtype)
    last_bin = z.shape[-1] - 1
    y = torch.nan_to_num(target.to(dtype), nan=0.0).clamp(0, last_bin)
    left = y.floor().clamp(max=last_bin - 1)
    weight_left = (left + 1) - y
    weight_right = 1 - weight_left
    log_softmax = z.log_softmax(dim=-1)
    left_index = left.long().unsqueeze(-1)
    log_p_left = log_softmax.gather(-1, left_index).squeeze(-1)
    log_p_right = log_softmax.gather(-1, left_index + 1).squeeze(-1)
    return -(weight_left * log_p_left + weight_right * log_p_right)


def distribution_integral(pred: Tensor) -> Tensor:
    """E = sum_k softmax(z)_k * k over the last dimension, in pred's dtype."""
    dtype = accumulate_dtype(pred.dtype)
    z = pred.to(dtype)
    bins = torch.arange(z.shape[-1], device=z.device, dtype=dtype)
    return (z.softmax(dim=-1) * bins).sum(dim=-1).to(pred.dtype)


def quality_focal_loss(
    pred: Tensor,
    label: Tensor,
    score: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    loss = quality_focal_loss_per_anchor(pred, label, score, beta, activated)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def quality_focal_loss_dense(
    pred: Tensor,
    target: Tensor,
    *,
    beta: float = 2.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    loss = quality_focal_loss_dense_per_anchor(pred, target, beta, activated)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    """sigmoid_focal_loss_elementwise, times weight, then weight_reduce_loss: "mean" averages
    over all N x C elements, or is sum / (avg_factor + eps) (mmdetection's FocalLoss)."""
    loss = sigmoid_focal_loss_elementwise(pred, target, alpha, gamma, activated, class_weight=class_weight)
    return weight_reduce_loss(loss, elementwise_weight(weight, loss), reduction, avg_factor)


def varifocal_loss(
    pred: Tensor,
    target: Tensor,
    score: Optional[Tensor] = None,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    detach_weight: bool = False,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
    activated: bool = False,
) -> Tensor:
    """varifocal_loss_elementwise, times weight, then weight_reduce_loss (as sigmoid_focal_loss)."""
    loss = varifocal_loss_elementwise(
        pred, target, score, alpha, gamma, iou_weighted, detach_weight, activated, class_weight=class_weight
    )
    return weight_reduce_loss(loss, elementwise_weight(weight, loss), reduction, avg_factor)


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    loss = distribution_focal_loss_per_row(pred, target)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)
