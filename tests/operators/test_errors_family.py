"""Sigmoid focal and varifocal loss: bad input gives a clear error naming the argument, and
nothing is modified; empty input, NaN/inf logits and out-of-range labels are handled as for
QFL (test_errors.py); the operators called directly check what keeps their kernels in
bounds."""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops

OPS = torch.ops.gfl_ops
META = "meta"  # a second device that every machine has


def _inputs(n=6, c=4):
    gen = torch.Generator().manual_seed(11)
    pred = torch.randn(n, c, generator=gen)
    label = torch.tensor([0, c, 1, -1, 3, 2][:n])
    score = torch.rand(n, generator=gen)
    dense = torch.rand(n, c, generator=gen) * (torch.rand(n, c, generator=gen) < 0.5)
    return pred, label, score, dense


COMMON_BAD = {
    # name: (kwargs-modifier, exception, message fragment); applied to focal and varifocal
    "nan_gamma": (lambda a: a.update(gamma=float("nan")), ValueError, "gamma must be a finite number >= 0"),
    "negative_gamma": (lambda a: a.update(gamma=-1.0), ValueError, "gamma must be a finite number >= 0"),
    "inf_alpha": (lambda a: a.update(alpha=float("inf")), ValueError, "alpha must be a finite number"),
    "nan_alpha": (lambda a: a.update(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    "string_alpha": (lambda a: a.update(alpha="0.25"), ValueError, "alpha must be a finite number"),
    "class_weight_length": (
        lambda a: a.update(class_weight=torch.ones(5)),
        ValueError,
        "class_weight must have shape (4,), one weight per class",
    ),
    "class_weight_2d": (
        lambda a: a.update(class_weight=torch.ones(1, 4)),
        ValueError,
        "class_weight must have shape (4,)",
    ),
    "class_weight_on_meta": (
        lambda a: a.update(class_weight=torch.ones(4, device=META)),
        ValueError,
        "class_weight is on meta but pred is on cpu",
    ),
    "integer_class_weight": (
        lambda a: a.update(class_weight=torch.ones(4, dtype=torch.long)),
        TypeError,
        "class_weight must be a floating-point tensor",
    ),
    "class_weight_requires_grad": (
        lambda a: a.update(class_weight=torch.ones(4, requires_grad=True)),
        ValueError,
        "class_weight requires grad",
    ),
    "weight_shape": (
        lambda a: a.update(weight=torch.ones(5)),
        ValueError,
        "weight must have the anchor shape (6,) or pred's shape (6, 4)",
    ),
    "weight_wrong_elementwise_shape": (
        lambda a: a.update(weight=torch.ones(6, 3)),
        ValueError,
        "weight must have the anchor shape (6,) or pred's shape (6, 4)",
    ),
    "flag_not_bool": (lambda a: a.update(activated=1), TypeError, "activated must be True or False"),
    "sum_with_avg_factor": (
        lambda a: a.update(reduction="sum", avg_factor=2.0),
        ValueError,
        "avg_factor can not be used",
    ),
    "invalid_reduction": (lambda a: a.update(reduction="avg"), ValueError, "reduction must be one of"),
    "pred_1d": (lambda a: a.update(pred=a["pred"][:, 0]), ValueError, "pred must be (N, C) or (B, C, d1, ..., dk)"),
    "integer_pred": (lambda a: a.update(pred=a["pred"].long()), TypeError, "pred must be float16, bfloat16, float32"),
}

FOCAL_BAD = {
    "dense_target_shape": (
        lambda a: a.update(target=torch.rand(6, 3)),
        ValueError,
        "a dense target must have pred's shape (6, 4), got (6, 3)",
    ),
    "float_labels": (
        lambda a: a.update(target=a["target"].float()),
        TypeError,
        "labels (a target without pred's class dimension) must be integers",
    ),
    "labels_shape": (lambda a: a.update(target=a["target"][:4]), ValueError, "target must have shape (6,)"),
    "target_on_meta": (
        lambda a: a.update(target=a["target"].to(META)),
        ValueError,
        "target is on meta but pred is on cpu",
    ),
    "target_not_a_tensor": (lambda a: a.update(target=[0, 1]), TypeError, "target must be a torch.Tensor"),
    "dense_target_requires_grad": (
        lambda a: a.update(target=torch.rand(6, 4, requires_grad=True)),
        ValueError,
        "target requires grad",
    ),
}

VARIFOCAL_BAD = {
    "dense_target_shape": (
        lambda a: a.update(target=torch.rand(6, 3)),
        ValueError,
        "target must have pred's shape (6, 4)",
    ),
    "integer_dense_target": (
        lambda a: a.update(target=torch.ones(6, 4, dtype=torch.long)),
        TypeError,
        "target must be a floating-point tensor",
    ),
    "labels_without_score": (lambda a: a.update(target=a["target"][0]), ValueError, "target must have pred's shape"),
    "triple_target": (lambda a: a.update(target=(a["target"][0],) * 3), TypeError, "a (label, score) pair"),
    "float_labels": (
        lambda a: a.update(target=(a["target"][0].float(), a["target"][1])),
        TypeError,
        "label must be an integer tensor",
    ),
    "score_shape": (
        lambda a: a.update(target=(a["target"][0], a["target"][1][:3])),
        ValueError,
        "score must have shape (6,)",
    ),
    "iou_weighted_not_bool": (lambda a: a.update(iou_weighted="yes"), TypeError, "iou_weighted must be True or False"),
    "detach_weight_not_bool": (
        lambda a: a.update(detach_weight=None),
        TypeError,
        "detach_weight must be True or False",
    ),
}


def _tensors(arguments):
    """The tensors among the arguments, those inside a (label, score) pair included."""
    for value in arguments.values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor) and item.device.type != META:
                yield item


def _check_bad(fn, arguments, modify, exception, fragment):
    modify(arguments)
    originals = list(_tensors(arguments))
    copies = [tensor.clone() for tensor in originals]
    with pytest.raises(exception, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fn(**arguments)
    for original, copy in zip(originals, copies):  # nothing was modified in place
        assert torch.equal(original, copy)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", sorted({**COMMON_BAD, **FOCAL_BAD}))
def test_sigmoid_focal_loss_bad_input(name, backend):
    if backend == "reference" and name in ("class_weight_requires_grad", "dense_target_requires_grad"):
        pytest.skip("the reference differentiates targets and class weights: they may require grad")
    pred, label, _, _ = _inputs()
    arguments = dict(pred=pred, target=label, backend=backend)
    _check_bad(gfl_ops.sigmoid_focal_loss, arguments, *{**COMMON_BAD, **FOCAL_BAD}[name])


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", sorted({**COMMON_BAD, **VARIFOCAL_BAD}))
def test_varifocal_loss_bad_input(name, backend):
    if backend == "reference" and name == "class_weight_requires_grad":
        pytest.skip("the reference differentiates class weights: they may require grad")
    pred, label, score, _ = _inputs()
    arguments = dict(pred=pred, target=(label, score), backend=backend)
    _check_bad(gfl_ops.varifocal_loss, arguments, *{**COMMON_BAD, **VARIFOCAL_BAD}[name])


def test_module_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        gfl_ops.nn.FocalLoss(gamma=-2.0)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        gfl_ops.nn.FocalLoss(alpha=float("nan"))
    with pytest.raises(ValueError, match="only the sigmoid form"):
        gfl_ops.nn.VarifocalLoss(use_sigmoid=False)
    with pytest.raises(TypeError, match="iou_weighted must be True or False"):
        gfl_ops.nn.VarifocalLoss(iou_weighted=1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        gfl_ops.nn.VarifocalLoss(reduction="avg")
    assert gfl_ops.nn.FocalLoss(alpha=None).alpha is None  # no alpha weighting, as torchvision's alpha < 0


DIRECT_BAD = {
    "focal_int32_labels": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(6, dtype=torch.int32), None, None, 0.25, 2.0, False, "none", False
    ),
    "focal_labels_shape": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(5, dtype=torch.long), None, None, 0.25, 2.0, False, "none", False
    ),
    "focal_dense_dtype": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.rand(6, 4, dtype=torch.float64), None, None, 0.25, 2.0, False, "none", False
    ),
    "focal_dense_half_of_float32": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.rand(6, 4).half(), None, None, 0.25, 2.0, False, "none", False
    ),
    "focal_dense_double_of_half": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4).half(), torch.rand(6, 4, dtype=torch.float64), None, None, 0.25, 2.0, False, "none", False
    ),
    "focal_nan_alpha": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(6, dtype=torch.long), None, None, float("nan"), 2.0, False, "none", False
    ),
    "focal_negative_gamma": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(6, dtype=torch.long), None, None, 0.25, -1.0, False, "none", False
    ),
    "focal_class_weight_length": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(6, dtype=torch.long), None, torch.ones(3), 0.25, 2.0, False, "none", False
    ),
    "focal_class_weight_float64": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4),
        torch.zeros(6, dtype=torch.long),
        None,
        torch.ones(4, dtype=torch.float64),
        0.25,
        2.0,
        False,
        "none",
        False,
    ),
    "focal_element_weight_shape": lambda: OPS._sigmoid_focal_loss_native(
        torch.randn(6, 4), torch.zeros(6, dtype=torch.long), torch.ones(6, 3), None, 0.25, 2.0, False, "none", False
    ),
    "varifocal_labels_without_score": lambda: OPS._varifocal_loss_native(
        torch.randn(6, 4),
        torch.zeros(6, dtype=torch.long),
        None,
        None,
        None,
        0.75,
        2.0,
        True,
        False,
        False,
        "none",
        False,
    ),
    "varifocal_score_with_dense": lambda: OPS._varifocal_loss_native(
        torch.randn(6, 4), torch.rand(6, 4), torch.rand(6), None, None, 0.75, 2.0, True, False, False, "none", False
    ),
    "varifocal_score_shape": lambda: OPS._varifocal_loss_native(
        torch.randn(6, 4),
        torch.zeros(6, dtype=torch.long),
        torch.rand(5),
        None,
        None,
        0.75,
        2.0,
        True,
        False,
        False,
        "none",
        False,
    ),
    "varifocal_score_on_meta": lambda: OPS._varifocal_loss_native(
        torch.randn(6, 4),
        torch.zeros(6, dtype=torch.long),
        torch.rand(6, device=META),
        None,
        None,
        0.75,
        2.0,
        True,
        False,
        False,
        "none",
        False,
    ),
    "varifocal_reduction_mean": lambda: OPS._varifocal_loss_native(
        torch.randn(6, 4), torch.rand(6, 4), None, None, None, 0.75, 2.0, True, False, False, "mean", False
    ),
}

DIRECT_MESSAGES = {
    "focal_int32_labels": "labels) must be int64",
    "focal_labels_shape": "label must have shape [6]",
    "focal_dense_dtype": "target must have pred's dtype (Float), got Double",
    "focal_dense_half_of_float32": "target must have pred's dtype (Float), got Half",
    "focal_dense_double_of_half": "target must have pred's dtype (Half or Float), got Double",
    "focal_nan_alpha": "alpha must be finite",
    "focal_negative_gamma": "gamma must be finite, >= 0",
    "focal_class_weight_length": "class_weight must have shape (4), one weight per class",
    "focal_class_weight_float64": "class_weight must be Float",
    "focal_element_weight_shape": "weight must have the loss's shape",
    "varifocal_labels_without_score": "integer labels need a score",
    "varifocal_score_with_dense": "score goes with integer labels",
    "varifocal_score_shape": "score must have shape [6]",
    "varifocal_score_on_meta": "all tensors must be on pred's device cpu, got one on meta",
    "varifocal_reduction_mean": 'reduction must be "none" or "sum"',
}


@pytest.mark.parametrize("name", sorted(DIRECT_BAD))
def test_direct_operator_bad_input_raises(name):
    with pytest.raises(
        (RuntimeError, ValueError),
        match=DIRECT_MESSAGES[name].replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        DIRECT_BAD[name]()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_input(backend, reduction):
    """No anchors: a mean of nothing is 0 (not NaN), "none" is empty of pred's shape, and the
    gradient is an empty tensor of pred's shape."""
    for fn, target in (
        (gfl_ops.sigmoid_focal_loss, torch.zeros(0, dtype=torch.long)),
        (gfl_ops.varifocal_loss, (torch.zeros(0, dtype=torch.long), torch.zeros(0))),
    ):
        pred = torch.zeros(0, 5, requires_grad=True)
        loss = fn(pred, target, reduction=reduction, backend=backend)
        assert loss.shape == ((0, 5) if reduction == "none" else ())
        if reduction != "none":
            assert loss.item() == 0.0
            loss.backward()
            assert pred.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_and_inf_logits_propagate_as_bce_with_logits(dtype):
    """gamma = 0 and no alpha: the focal loss is BCE with logits, NaN and inf included."""
    pred = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, 3.0]], dtype=dtype)
    for t in (torch.zeros_like(pred), torch.ones_like(pred), torch.full_like(pred, 0.3)):
        loss = gfl_ops.sigmoid_focal_loss(pred, t, alpha=None, gamma=0.0, reduction="none", backend="native")
        expected = F.binary_cross_entropy_with_logits(pred, t, reduction="none")
        torch.testing.assert_close(loss, expected, equal_nan=True, rtol=1e-6, atol=0)


def test_out_of_range_labels_are_background():
    """Labels C, -1 and huge values give an all-negative anchor, as mmdetection's one-hot over
    C + 1 columns with the last dropped."""
    pred = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([3, -1, 10**12, -(10**12), 4])
    loss = gfl_ops.sigmoid_focal_loss(pred, labels, reduction="none", backend="native")
    zeros = gfl_ops.sigmoid_focal_loss(pred, torch.zeros_like(pred), reduction="none", backend="native")
    torch.testing.assert_close(loss, zeros, rtol=0, atol=0)
    score = torch.rand(5, dtype=torch.float64)
    by_label = gfl_ops.varifocal_loss(pred, (labels, score), reduction="none", backend="native")
    torch.testing.assert_close(
        by_label,
        gfl_ops.varifocal_loss(pred, torch.zeros_like(pred), reduction="none", backend="native"),
        rtol=0,
        atol=0,
    )
