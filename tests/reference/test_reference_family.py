"""The family of BCE(x, t) * w losses in gfl_ops.reference (sigmoid focal, varifocal, QFL's
class_weight) against each framework's own formula, copied here with its source named:

- torchvision 0.29.1, torchvision/ops/focal_loss.py::sigmoid_focal_loss;
- mmdetection 3.3.0, mmdet/models/losses/focal_loss.py::py_sigmoid_focal_loss and
  py_focal_loss_with_prob, FocalLoss.forward (one-hot of labels), varifocal_loss.py::
  varifocal_loss, utils.py::weight_reduce_loss;
- ultralytics 8.4.190, ultralytics/utils/loss.py::VarifocalLoss.forward and
  ultralytics/models/utils/loss.py::DETRLoss._get_loss_class (its one-hot);
- RT-DETR (lyuwenyu/RT-DETR @ 830ef9f), rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py::
  SetCriterion.loss_labels_vfl (D-FINE and DEIM keep it);
- PP-YOLOE (PaddlePaddle/PaddleDetection), ppdet/modeling/heads/ppyoloe_head.py::
  PPYOLOEHead._varifocal_loss, on probabilities.

Values and gradients (torch.autograd.grad) in float64 (rtol 1e-10) and float32; half inputs
against the framework's formula on pred.float(). No expected value comes from the code under
test. Needs torch only: gfl_ops.reference does not use the compiled extension, and is read
from its file when gfl_ops cannot be imported (then run with --noconftest, since conftest.py
imports gfl_ops).
"""

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


def import_reference():
    """gfl_ops.reference; where gfl_ops/__init__.py cannot run (its compiled extension is not
    built, or is older than the Python code), the file itself, with gfl_ops/ as the search
    path of a package that runs no __init__ (reference.py imports only ._reduction)."""
    try:
        from gfl_ops import reference

        return reference
    except (ImportError, RuntimeError, OSError):
        package = types.ModuleType("gfl_ops_reference_only")
        package.__path__ = [str(Path(__file__).resolve().parents[2] / "gfl_ops")]
        sys.modules[package.__name__] = package
        return importlib.import_module(package.__name__ + ".reference")


reference = import_reference()

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
GAMMAS = (0.0, 1.0, 1.5, 2.0)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def generator(*key) -> torch.Generator:
    seed = 0
    for ch in "-".join(map(str, key)):
        seed = (seed * 131 + ord(ch)) % (2**31 - 1)
    return torch.Generator().manual_seed(seed)


def logits(shape, dtype, gen, scale=3.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def value_and_grad(fn, pred, cotangent=None):
    """fn(pred) and d<fn(pred), cotangent>/dpred (the plain sum for a scalar or no cotangent)."""
    leaf = pred.detach().requires_grad_()
    value = fn(leaf)
    total = value.sum() if cotangent is None else (value * cotangent).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return value.detach(), grad


def assert_same_value_and_grad(ours, theirs, pred, dtype, cotangent=None):
    value, grad = value_and_grad(ours, pred, cotangent)
    expected_value, expected_grad = value_and_grad(theirs, pred, cotangent)
    torch.testing.assert_close(value, expected_value.to(value.dtype), **TOLERANCES[dtype])
    torch.testing.assert_close(grad, expected_grad.to(grad.dtype), **TOLERANCES[dtype])


def assert_half_matches_float(ours, theirs, pred):
    """Half pred: the reference (float32 maths) against the framework on pred.float(); the
    loss to float32 tolerances, the gradient (rounded to pred's dtype) to one unit of it."""
    value, grad = value_and_grad(ours, pred)
    expected_value, expected_grad = value_and_grad(theirs, pred.float())
    assert value.dtype == torch.float32 and grad.dtype == pred.dtype
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(pred.dtype).eps
    torch.testing.assert_close(grad.float(), expected_grad, rtol=eps, atol=eps * expected_grad.abs().max().item())


def class_last(pred_bqc):
    """ultralytics / RT-DETR hold (B, Q, C); the reference takes class dim 1: (B, C, Q)."""
    return pred_bqc.transpose(1, 2)


# --------------------------------------------------------------------------------------
# The frameworks' formulas, as written there
# --------------------------------------------------------------------------------------


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
    # torchvision 0.29.1 torchvision/ops/focal_loss.py::sigmoid_focal_loss (less its checks)
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "none":
        pass
    elif reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def mmdet_weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    # mmdetection 3.3.0 mmdet/models/losses/utils.py::weight_reduce_loss (and reduce_loss)
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            loss = loss.mean()
        elif reduction == "sum":
            loss = loss.sum()
    else:
        if reduction == "mean":
            eps = torch.finfo(torch.float32).eps
            loss = loss.sum() / (avg_factor + eps)
        elif reduction != "none":
            raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def mmdet_view_weight(weight, loss):
    # mmdetection 3.3.0 focal_loss.py::py_sigmoid_focal_loss, its handling of weight
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                assert weight.numel() == loss.numel()
                weight = weight.view(loss.size(0), -1)
        assert weight.ndim == loss.ndim
    return weight


def mmdet_one_hot(label, num_classes):
    # mmdetection 3.3.0 focal_loss.py::FocalLoss.forward (CPU path): labels in [0, C]
    target = F.one_hot(label, num_classes=num_classes + 1)
    return target[:, :num_classes]


def mmdet_py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None):
    # mmdetection 3.3.0 mmdet/models/losses/focal_loss.py::py_sigmoid_focal_loss
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    weight = mmdet_view_weight(weight, loss)
    return mmdet_weight_reduce_loss(loss, weight, reduction, avg_factor)


def mmdet_py_focal_loss_with_prob(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None):
    # mmdetection 3.3.0 mmdet/models/losses/focal_loss.py::py_focal_loss_with_prob
    if pred.dim() != target.dim():
        num_classes = pred.size(1)
        target = F.one_hot(target, num_classes=num_classes + 1)
        target = target[:, :num_classes]
    target = target.type_as(pred)
    pt = (1 - pred) * target + pred * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy(pred, target, reduction="none") * focal_weight
    weight = mmdet_view_weight(weight, loss)
    return mmdet_weight_reduce_loss(loss, weight, reduction, avg_factor)


def mmdet_varifocal_loss(
    pred, target, weight=None, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="mean", avg_factor=None
):
    # mmdetection 3.3.0 mmdet/models/losses/varifocal_loss.py::varifocal_loss
    assert pred.size() == target.size()
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    if iou_weighted:
        focal_weight = (
            target * (target > 0.0).float() + alpha * (pred_sigmoid - target).abs().pow(gamma) * (target <= 0.0).float()
        )
    else:
        focal_weight = (target > 0.0).float() + alpha * (pred_sigmoid - target).abs().pow(gamma) * (
            target <= 0.0
        ).float()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return mmdet_weight_reduce_loss(loss, weight, reduction, avg_factor)


def ultralytics_one_hot(targets, nc):
    # ultralytics 8.4.190 ultralytics/models/utils/loss.py::DETRLoss._get_loss_class
    bs, nq = targets.shape
    one_hot = torch.zeros((bs, nq, nc + 1), dtype=torch.int64, device=targets.device)
    one_hot.scatter_(2, targets.unsqueeze(-1), 1)
    return one_hot[..., :-1]


def ultralytics_varifocal_loss(pred_score, gt_score, label, gamma=2.0, alpha=0.75):
    # ultralytics 8.4.190 ultralytics/utils/loss.py::VarifocalLoss.forward (autocast off)
    weight = alpha * pred_score.sigmoid().pow(gamma) * (1 - label) + gt_score * label
    loss = (
        (F.binary_cross_entropy_with_logits(pred_score.float(), gt_score.float(), reduction="none") * weight)
        .mean(1)
        .sum()
    )
    return loss


def rtdetr_loss_labels_vfl(src_logits, target_classes, target_score_o, num_classes, num_boxes, alpha=0.75, gamma=2.0):
    # RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py::SetCriterion.loss_labels_vfl
    # (from the one-hot on; target_score_o holds the IoUs of the matched queries)
    target = F.one_hot(target_classes, num_classes=num_classes + 1)[..., :-1]
    target_score = target_score_o.unsqueeze(-1) * target
    pred_score = F.sigmoid(src_logits).detach()
    weight = alpha * pred_score.pow(gamma) * (1 - target) + target_score
    loss = F.binary_cross_entropy_with_logits(src_logits, target_score, weight=weight, reduction="none")
    loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
    return loss


def ppyoloe_varifocal_loss_torch_port(pred_score, gt_score, label, alpha=0.75, gamma=2.0):
    # PaddleDetection ppdet/modeling/heads/ppyoloe_head.py::PPYOLOEHead._varifocal_loss, in
    # torch: torch's binary_cross_entropy refuses a weight that requires grad, so a literal
    # port detaches it.
    weight = alpha * pred_score.pow(gamma) * (1 - label) + gt_score * label
    return F.binary_cross_entropy(pred_score, gt_score, weight=weight.detach(), reduction="sum")


def ppyoloe_varifocal_loss_paddle(pred_score, gt_score, label, alpha=0.75, gamma=2.0):
    # The same in Paddle's own semantics: paddle.nn.functional.binary_cross_entropy is
    # bce_loss(input, label) then multiply(out, weight), so the weight is differentiated.
    weight = alpha * pred_score.pow(gamma) * (1 - label) + gt_score * label
    return (F.binary_cross_entropy(pred_score, gt_score, reduction="none") * weight).sum()


# --------------------------------------------------------------------------------------
# Sigmoid focal loss
# --------------------------------------------------------------------------------------


def focal_inputs(shape, dtype, target_kind, key):
    gen = generator("focal", shape, dtype, target_kind, *key)
    pred = logits(shape, dtype, gen)
    if target_kind == "binary":
        target = (torch.rand(shape, generator=gen) < 0.3).to(torch.float64)
    else:
        target = torch.rand(shape, generator=gen, dtype=torch.float64)
    return pred, target.to(dtype), torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("target_kind", ["binary", "soft"])
@pytest.mark.parametrize("shape", [(13, 7), (2, 5, 3, 4)], ids=["NC", "BCHW"])
def test_focal_elementwise_matches_torchvision(dtype, gamma, alpha, target_kind, shape):
    pred, target, cotangent = focal_inputs(shape, dtype, target_kind, (gamma, alpha))
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss_elementwise(x, target, alpha, gamma),
        lambda x: torchvision_sigmoid_focal_loss(x, target, alpha, gamma),
        pred,
        dtype,
        cotangent,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["binary", "soft"])
def test_focal_reductions_match_torchvision(dtype, reduction, target_kind):
    pred, target, _ = focal_inputs((11, 6), dtype, target_kind, (reduction,))
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, reduction=reduction),
        lambda x: torchvision_sigmoid_focal_loss(x, target, 0.25, 2.0, reduction),
        pred,
        dtype,
    )


def test_focal_matches_the_real_torchvision():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed here")
    for gamma, alpha, reduction in [(2.0, 0.25, "none"), (1.5, -1, "mean"), (0.0, 0.5, "sum")]:
        pred, target, _ = focal_inputs((9, 5), torch.float64, "soft", ("real", gamma))
        assert_same_value_and_grad(
            lambda x: reference.sigmoid_focal_loss(x, target, alpha=alpha, gamma=gamma, reduction=reduction),
            lambda x: torchvision.ops.sigmoid_focal_loss(x, target, alpha, gamma, reduction),
            pred,
            torch.float64,
        )


WEIGHTINGS = ["none", "per_anchor", "per_element"]
# (reduction, avg_factor): "sum" with an avg_factor raises (test_focal_sum_with_avg_factor_raises)
REDUCTIONS = [("none", None), ("none", 3.5), ("sum", None), ("mean", None), ("mean", 3.5), ("mean", "tensor")]


def mmdet_case(dtype, num_anchors, num_classes, weighting, avg_factor, key):
    gen = generator("mmdet", dtype, weighting, avg_factor, *key)
    pred = logits((num_anchors, num_classes), dtype, gen)
    label = torch.randint(0, num_classes + 1, (num_anchors,), generator=gen)  # C: background
    label[0] = num_classes
    weight = {
        "none": None,
        "per_anchor": torch.rand(num_anchors, generator=gen, dtype=torch.float64).to(dtype),
        "per_element": torch.rand(num_anchors, num_classes, generator=gen, dtype=torch.float64).to(dtype),
    }[weighting]
    if avg_factor == "tensor":
        avg_factor = torch.tensor(4.25, dtype=dtype)
    return pred, label, weight, avg_factor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction, avg_factor", REDUCTIONS, ids=str)
@pytest.mark.parametrize("gamma", [1.5, 2.0])
def test_focal_with_labels_matches_mmdetection(dtype, weighting, reduction, avg_factor, gamma):
    pred, label, weight, avg_factor = mmdet_case(dtype, 17, 5, weighting, avg_factor, (reduction, gamma))
    target = mmdet_one_hot(label, 5)
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss(
            x, label, alpha=0.25, gamma=gamma, weight=weight, reduction=reduction, avg_factor=avg_factor
        ),
        lambda x: mmdet_py_sigmoid_focal_loss(x, target, weight, gamma, 0.25, reduction, avg_factor),
        pred,
        dtype,
    )


def test_focal_sum_with_avg_factor_raises():
    pred, label, _, _ = mmdet_case(torch.float64, 4, 3, "none", None, ())
    with pytest.raises(ValueError):
        mmdet_py_sigmoid_focal_loss(pred, mmdet_one_hot(label, 3), reduction="sum", avg_factor=2.0)
    with pytest.raises(ValueError):
        reference.sigmoid_focal_loss(pred, label, reduction="sum", avg_factor=2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_focal_on_probabilities_matches_mmdetection(dtype, gamma):
    """activated=True: mmdetection's py_focal_loss_with_prob (F.binary_cross_entropy)."""
    pred, label, weight, _ = mmdet_case(dtype, 15, 4, "per_anchor", None, ("prob", gamma))
    probability = torch.sigmoid(pred.double()).to(dtype)
    assert_same_value_and_grad(
        lambda p: reference.sigmoid_focal_loss(p, label, gamma=gamma, weight=weight, activated=True, avg_factor=6.0),
        lambda p: mmdet_py_focal_loss_with_prob(p, label, weight, gamma, 0.25, "mean", 6.0),
        probability,
        dtype,
    )


def test_focal_labels_outside_the_classes_are_background():
    """-1, C and larger match no class: their rows are all negatives (torchvision with a zero row)."""
    gen = generator("focal-background")
    pred = logits((6, 4), torch.float64, gen)
    label = torch.tensor([2, -1, 4, 9, 0, -7])
    target = torch.zeros(6, 4, dtype=torch.float64)
    target[0, 2] = target[4, 0] = 1.0
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss_elementwise(x, label),
        lambda x: torchvision_sigmoid_focal_loss(x, target),
        pred,
        torch.float64,
    )


def test_focal_labels_of_channel_first_pred():
    """(B, C, H, W) pred with (B, H, W) labels: the one-hot is over dim 1."""
    gen = generator("focal-nchw")
    pred = logits((2, 5, 3, 4), torch.float64, gen)
    label = torch.randint(0, 6, (2, 3, 4), generator=gen)
    target = F.one_hot(label, 6)[..., :5].movedim(-1, 1).double()
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss(x, label, reduction="sum"),
        lambda x: torchvision_sigmoid_focal_loss(x, target, reduction="sum"),
        pred,
        torch.float64,
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [1.5, 2.0])
def test_focal_half_inputs_compute_in_float32(dtype, gamma):
    gen = generator("focal-half", dtype, gamma)
    pred = logits((19, 6), dtype, gen)
    label = torch.randint(0, 7, (19,), generator=gen)
    target = mmdet_one_hot(label, 6).float()
    assert_half_matches_float(
        lambda x: reference.sigmoid_focal_loss_elementwise(x, label, 0.25, gamma),
        lambda x: torchvision_sigmoid_focal_loss(x, target, 0.25, gamma),
        pred,
    )


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5, 2.0])
def test_focal_gradient_is_zero_where_the_factor_vanishes(gamma):
    """1 - p_t = 0 (sigma(x) rounds to t = 1, or to t = 0): value 0 and derivative 0 (the
    modulating factor's convention); torch's pow gives NaN there for gamma < 1."""
    pred = torch.tensor([[800.0, -800.0, 0.3]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    loss, grad = value_and_grad(lambda x: reference.sigmoid_focal_loss_elementwise(x, target, 0.25, gamma), pred)
    assert loss[0, 0] == 0 and loss[0, 1] == 0 and grad[0, 0] == 0 and grad[0, 1] == 0
    torch.testing.assert_close(loss[0, 2], torchvision_sigmoid_focal_loss(pred, target, 0.25, gamma)[0, 2])


def test_focal_class_weight_is_mmdetections_per_element_weight():
    pred, label, _, _ = mmdet_case(torch.float64, 12, 4, "none", None, ("class_weight",))
    class_weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    anchor_weight = torch.rand(12, generator=generator("cw-anchor"), dtype=torch.float64)
    element_weight = anchor_weight[:, None] * class_weight
    assert_same_value_and_grad(
        lambda x: reference.sigmoid_focal_loss(
            x, label, weight=anchor_weight, class_weight=class_weight, avg_factor=5.0
        ),
        lambda x: mmdet_py_sigmoid_focal_loss(x, mmdet_one_hot(label, 4), element_weight, avg_factor=5.0),
        pred,
        torch.float64,
    )


# --------------------------------------------------------------------------------------
# Varifocal loss
# --------------------------------------------------------------------------------------


def vfl_dense_case(dtype, shape, key):
    """A VFNet-like dense target: IoU in (0, 1) on the labelled class of 40% of the anchors."""
    gen = generator("vfl-dense", dtype, shape, *key)
    pred = logits(shape, dtype, gen)
    num_classes = shape[1]
    anchor_shape = shape[:1] + shape[2:]
    label = torch.randint(0, num_classes, anchor_shape, generator=gen)
    label = torch.where(torch.rand(anchor_shape, generator=gen) < 0.4, label, num_classes)
    score = 0.05 + 0.9 * torch.rand(anchor_shape, generator=gen, dtype=torch.float64)
    one_hot = F.one_hot(label, num_classes + 1)[..., :num_classes].movedim(-1, 1)
    return pred, (score.unsqueeze(1) * one_hot).to(dtype), label, score.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("iou_weighted", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_varifocal_dense_matches_mmdetection(dtype, gamma, iou_weighted, reduction):
    pred, target, _, _ = vfl_dense_case(dtype, (23, 6), (gamma, iou_weighted, reduction))
    weight = torch.rand(23, 6, generator=generator("vfl-w", gamma), dtype=torch.float64).to(dtype)
    avg_factor = 7.0 if reduction == "mean" else None
    kwargs = dict(alpha=0.75, gamma=gamma, iou_weighted=iou_weighted, reduction=reduction, avg_factor=avg_factor)
    assert_same_value_and_grad(
        lambda x: reference.varifocal_loss(x, target, weight=weight, **kwargs),
        lambda x: mmdet_varifocal_loss(x, target, weight, **kwargs),
        pred,
        dtype,
    )


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_varifocal_labels_match_mmdetection_when_every_score_is_positive(iou_weighted):
    """(label, score) with scores > 0 is mmdetection's dense target; an anchor-shaped weight is
    broadcast over the classes ((N,) viewed (N, 1))."""
    pred, target, label, score = vfl_dense_case(torch.float64, (2, 5, 3, 4), ("labels", iou_weighted))
    weight = torch.rand(2, 3, 4, generator=generator("vfl-labels-w"), dtype=torch.float64)
    assert_same_value_and_grad(
        lambda x: reference.varifocal_loss(x, label, score, iou_weighted=iou_weighted, weight=weight, reduction="sum"),
        lambda x: mmdet_varifocal_loss(x, target, weight.unsqueeze(1), iou_weighted=iou_weighted, reduction="sum"),
        pred,
        torch.float64,
    )


def detr_case(dtype, batch, queries, num_classes, key):
    """(B, Q, C) logits, (B, Q) labels (C: unmatched) and IoUs; one matched query has IoU 0."""
    gen = generator("detr", dtype, *key)
    pred = logits((batch, queries, num_classes), dtype, gen)
    label = torch.randint(0, num_classes, (batch, queries), generator=gen)
    label = torch.where(torch.rand(batch, queries, generator=gen) < 0.3, label, num_classes)
    label[0, 0] = 1
    iou = torch.rand(batch, queries, generator=gen, dtype=torch.float64)
    iou[0, 0] = 0.0  # a positive whose score is 0
    iou = torch.where(label < num_classes, iou, 0.0).to(dtype)
    return pred, label, iou


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_varifocal_matches_ultralytics(dtype, gamma):
    """Not detached; a positive with score 0 keeps weight gt_score = 0 (it is no negative).
    ultralytics computes its BCE in float32 (pred_score.float()) whatever pred's dtype, so
    float64 inputs are compared to float32's tolerances."""
    pred, label, iou = detr_case(dtype, 2, 11, 5, ("ultralytics", gamma))
    one_hot = ultralytics_one_hot(label, 5)
    gt_score = iou.view(2, 11, 1) * one_hot
    assert_same_value_and_grad(
        lambda x: reference.varifocal_loss_elementwise(class_last(x), label, iou, 0.75, gamma).sum() / 11,
        lambda x: ultralytics_varifocal_loss(x, gt_score, one_hot, gamma, 0.75),
        pred,
        torch.float32,
    )


def test_varifocal_positive_with_score_zero_differs_from_the_dense_form():
    """The two target forms disagree on a positive of score 0 (label form: weight 0; dense:
    a negative, weight alpha p^gamma): the label form is the one ultralytics/RT-DETR use."""
    pred, label, iou = detr_case(torch.float64, 2, 11, 5, ("forms",))
    dense = (iou.view(2, 11, 1) * ultralytics_one_hot(label, 5)).double()
    by_label = reference.varifocal_loss_elementwise(class_last(pred), label, iou)
    by_dense = reference.varifocal_loss_elementwise(class_last(pred), class_last(dense))
    assert by_label[0, 1, 0] == 0
    expected = mmdet_varifocal_loss(pred[0, 0, 1:2], dense[0, 0, 1:2], reduction="none")
    torch.testing.assert_close(by_dense[0, 1, 0:1], expected, rtol=1e-12, atol=0)
    by_label[0, 1, 0] = by_dense[0, 1, 0]
    torch.testing.assert_close(by_label, by_dense, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_varifocal_detached_matches_rtdetr(dtype, gamma):
    """detach_weight=True is RT-DETR's loss_labels_vfl, gradient included: w (p - t) only."""
    pred, label, iou = detr_case(dtype, 3, 9, 4, ("rtdetr", gamma))
    num_boxes = 5.0
    fn = lambda detach: (  # noqa: E731
        lambda x: (
            reference.varifocal_loss_elementwise(class_last(x), label, iou, 0.75, gamma, detach_weight=detach).sum()
            / num_boxes
        )
    )
    rtdetr = lambda x: rtdetr_loss_labels_vfl(x, label, iou, 4, num_boxes, 0.75, gamma)  # noqa: E731
    assert_same_value_and_grad(fn(True), rtdetr, pred, dtype)
    if gamma > 0:
        _, detached_grad = value_and_grad(fn(True), pred)
        _, full_grad = value_and_grad(fn(False), pred)
        assert (detached_grad - full_grad).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gamma", [1.5, 2.0])
def test_varifocal_on_probabilities_matches_ppyoloe(dtype, gamma):
    """activated=True: detach_weight=True is the literal torch port (its BCE weight is a
    constant), detach_weight=False Paddle's own semantics (the weight is differentiated)."""
    pred, label, iou = detr_case(dtype, 2, 13, 6, ("ppyoloe", gamma))
    probability = torch.sigmoid(pred.double()).to(dtype)
    one_hot = ultralytics_one_hot(label, 6)
    gt_score = iou.view(2, 13, 1) * one_hot
    for detach, ppyoloe in [(True, ppyoloe_varifocal_loss_torch_port), (False, ppyoloe_varifocal_loss_paddle)]:
        assert_same_value_and_grad(
            lambda p: reference.varifocal_loss(
                class_last(p), label, iou, gamma=gamma, detach_weight=detach, activated=True, reduction="sum"
            ),
            lambda p: ppyoloe(p, gt_score, one_hot, 0.75, gamma),
            probability,
            dtype,
        )


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("detach", [False, True])
def test_varifocal_half_inputs_compute_in_float32(dtype, detach):
    pred, label, iou = detr_case(dtype, 2, 10, 5, ("half", detach))
    iou = iou.float()
    framework = rtdetr_loss_labels_vfl if detach else None
    one_hot = ultralytics_one_hot(label, 5)

    def theirs(x):
        if framework is not None:
            return framework(x, label, iou, 5, 10.0)
        return ultralytics_varifocal_loss(x, iou.view(2, 10, 1) * one_hot, one_hot)

    assert_half_matches_float(
        lambda x: reference.varifocal_loss_elementwise(class_last(x), label, iou, detach_weight=detach).sum() / 10,
        theirs,
        pred,
    )


def test_varifocal_class_weight_is_a_per_element_weight():
    pred, target, _, _ = vfl_dense_case(torch.float64, (14, 4), ("class_weight",))
    class_weight = torch.tensor([1.5, 0.25, 1.0, 2.0], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda x: reference.varifocal_loss(x, target, class_weight=class_weight, avg_factor=3.0),
        lambda x: mmdet_varifocal_loss(x, target, class_weight.expand(14, 4), avg_factor=3.0),
        pred,
        torch.float64,
    )


# --------------------------------------------------------------------------------------
# QFL's class_weight
# --------------------------------------------------------------------------------------


def qfl_by_hand(pred, target, beta, class_weight, activated):
    """sum_c class_weight[c] |p - y|^beta BCE, the BCE written out (softplus form / clamped logs)."""
    if activated:
        p = pred
        bce = -(target * torch.log(p).clamp_min(-100) + (1 - target) * torch.log1p(-p).clamp_min(-100))
    else:
        p = torch.sigmoid(pred)
        bce = pred.clamp_min(0) - pred * target + torch.log1p(torch.exp(-pred.abs()))
    shape = (1, -1) + (1,) * (pred.dim() - 2)
    return (class_weight.view(shape) * (p - target).abs() ** beta * bce).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("shape", [(9, 4), (2, 4, 3, 2)], ids=["NC", "BCHW"])
def test_qfl_class_weight_is_the_weighted_sum_over_classes(dtype, activated, shape):
    pred, target, label, score = vfl_dense_case(dtype, shape, ("qfl", activated))
    if activated:
        pred = torch.sigmoid(pred.double()).to(dtype)
    class_weight = torch.tensor([0.5, 2.0, 0.0, 1.25], dtype=dtype)
    expected = lambda x: qfl_by_hand(x, target, 2.0, class_weight, activated)  # noqa: E731
    assert_same_value_and_grad(
        lambda x: reference.quality_focal_loss_dense_per_anchor(x, target, 2.0, activated, class_weight=class_weight),
        expected,
        pred,
        dtype,
    )
    assert_same_value_and_grad(
        lambda x: reference.quality_focal_loss_per_anchor(x, label, score, 2.0, activated, class_weight=class_weight),
        expected,
        pred,
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_qfl_without_class_weight_is_unchanged(dtype):
    """class_weight=None (and a weight of ones) is bit for bit the QFL before class_weight."""
    pred, target, label, score = vfl_dense_case(dtype, (21, 5), ("qfl-unchanged",))

    def qfl_before(x):  # the body of quality_focal_loss_dense_per_anchor before class_weight
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, y = x.to(acc), target.to(acc)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        return (reference.modulating_factor(torch.sigmoid(x) - y, 2.0) * bce).sum(dim=1)

    expected, expected_grad = value_and_grad(qfl_before, pred)
    for fn in (
        lambda x: reference.quality_focal_loss_dense_per_anchor(x, target),
        lambda x: reference.quality_focal_loss_per_anchor(x, label, score),
        lambda x: reference.quality_focal_loss_per_anchor(x, label, score, class_weight=torch.ones(5, dtype=dtype)),
    ):
        loss, grad = value_and_grad(fn, pred)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
