"""gfl_ops.nn modules against mmdetection 3.x semantics.

The mmdetection-style implementation is tests/nn/mmdet_formulas.py, written from the formulas
of docs/MATH.md and mmdetection's code structure (nonzero + index_put for the positives, two
F.cross_entropy calls for DFL), independent of
gfl_ops.reference: it checks the modules, the native kernels and the reference at once.
"""

import pytest
import torch
import torch.nn.functional as F

import gfl_ops
import mmdet_formulas as mm
from gfl_ops.nn import DistributionFocalLoss, Integral, QualityFocalLoss
from _helpers import make_generator

BACKENDS = ["native", "reference"]


# --------------------------------------------------------------------------------------
# mmdetection-style eager implementation: tests/nn/mmdet_formulas.py,
# wrapped in mmdetection's module interface
# --------------------------------------------------------------------------------------


class MMQualityFocalLoss(torch.nn.Module):
    def __init__(self, beta=2.0, reduction="mean", loss_weight=1.0, activated=False):
        super().__init__()
        self.beta, self.reduction, self.loss_weight, self.activated = beta, reduction, loss_weight, activated

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        reduction = reduction_override if reduction_override else self.reduction
        if isinstance(target, torch.Tensor):
            loss = mm.quality_focal_loss_tensor_target(pred, target, self.beta, self.activated)
        elif self.activated:
            loss = mm.quality_focal_loss_with_prob(pred, *target, self.beta)
        else:
            loss = mm.quality_focal_loss(pred, *target, self.beta)
        return self.loss_weight * mm.weight_reduce_loss(loss, weight, reduction, avg_factor)


class MMDistributionFocalLoss(torch.nn.Module):
    def __init__(self, reduction="mean", loss_weight=1.0):
        super().__init__()
        self.reduction, self.loss_weight = reduction, loss_weight

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        reduction = reduction_override if reduction_override else self.reduction
        loss = mm.distribution_focal_loss(pred, target)
        return self.loss_weight * mm.weight_reduce_loss(loss, weight, reduction, avg_factor)


class MMIntegral(torch.nn.Module):
    def __init__(self, reg_max=16):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, x):
        x = F.softmax(x.reshape(-1, self.reg_max + 1), dim=1)
        return F.linear(x, self.project.type_as(x)).reshape(-1, 4)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _qfl_inputs(gen, n=12, c=7, activated=False):
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    pred = logits.sigmoid().clamp(0.02, 0.98) if activated else logits
    label = torch.randint(0, c, (n,), generator=gen)
    label[::3] = c  # background
    label[1::5] = -1  # ignored-style background
    score = torch.rand(n, generator=gen, dtype=torch.float64)
    weight = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return pred, label, score, weight


def _dfl_inputs(gen, rows=16, reg_max=16):
    pred = torch.randn(rows, reg_max + 1, generator=gen, dtype=torch.float64) * 2
    target = (torch.rand(rows, generator=gen, dtype=torch.float64) * reg_max).clamp(max=reg_max - 0.1)
    target[0], target[1] = 0.0, reg_max - 0.1
    weight = torch.rand(rows, generator=gen, dtype=torch.float64)
    return pred, target, weight


def _value_and_grad(module, pred, *args, **kwargs):
    leaf = pred.detach().requires_grad_()
    out = module(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    return out.detach(), grad


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)


CALL_OPTIONS = [
    dict(),
    dict(weight=True),
    dict(avg_factor=4.0),
    dict(avg_factor="tensor", weight=True),
    dict(reduction_override="sum", weight=True),
    dict(reduction_override="none"),
    dict(reduction_override="none", avg_factor=4.0),  # mmdetection ignores avg_factor with 'none'
]


def _call_kwargs(options, weight):
    kwargs = {}
    if options.get("weight"):
        kwargs["weight"] = weight
    if "avg_factor" in options:
        kwargs["avg_factor"] = (
            torch.tensor(3.5, dtype=torch.float64) if options["avg_factor"] == "tensor" else options["avg_factor"]
        )
    if "reduction_override" in options:
        kwargs["reduction_override"] = options["reduction_override"]
    return kwargs


# --------------------------------------------------------------------------------------
# QualityFocalLoss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", CALL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
@pytest.mark.parametrize("loss_weight", [1.0, 0.5])
def test_quality_focal_loss_module_matches_mmdetection(backend, options, activated, loss_weight):
    gen = make_generator("nn-qfl", options, activated, loss_weight)
    pred, label, score, weight = _qfl_inputs(gen, activated=activated)
    ours = QualityFocalLoss(beta=2.0, loss_weight=loss_weight, activated=activated, backend=backend)
    theirs = MMQualityFocalLoss(beta=2.0, loss_weight=loss_weight, activated=activated)
    kwargs = _call_kwargs(options, weight)
    _assert_same(
        _value_and_grad(ours, pred, (label, score), **kwargs), _value_and_grad(theirs, pred, (label, score), **kwargs)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.5, 2.0])
@pytest.mark.parametrize("activated", [False, True], ids=["logits", "activated"])
def test_quality_focal_loss_module_dense_target_matches_mmdetection(backend, beta, activated):
    gen = make_generator("nn-qfl-dense", beta, activated)
    pred, _, _, weight = _qfl_inputs(gen, activated=activated)
    target = torch.rand(pred.shape, generator=gen, dtype=torch.float64) * (torch.rand(pred.shape, generator=gen) < 0.3)
    ours = QualityFocalLoss(beta=beta, activated=activated, reduction="sum", loss_weight=2.0, backend=backend)
    theirs = MMQualityFocalLoss(beta=beta, activated=activated, reduction="sum", loss_weight=2.0)
    _assert_same(
        _value_and_grad(ours, pred, target, weight=weight), _value_and_grad(theirs, pred, target, weight=weight)
    )


def test_quality_focal_loss_module_label_form_equals_dense_form():
    """The (label, score) target and the dense target it stands for give the same loss."""
    gen = make_generator("nn-qfl-forms")
    pred, label, score, _ = _qfl_inputs(gen)
    dense = torch.zeros_like(pred)
    positive = (label >= 0) & (label < pred.shape[1])
    dense[positive.nonzero().squeeze(1), label[positive]] = score[positive]
    module = QualityFocalLoss(backend="native", reduction="none")
    torch.testing.assert_close(module(pred, (label, score)), module(pred, dense))


def test_quality_focal_loss_module_on_nchw_head_output():
    """(B, C, H, W) logits with (B, H, W) labels equal mmdetection's permute + reshape to (N, C)."""
    gen = make_generator("nn-qfl-nchw")
    pred = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    label = torch.randint(-1, 6, (2, 3, 4), generator=gen)
    score = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64)
    ours = QualityFocalLoss(backend="native")(pred, (label, score), avg_factor=3.0)
    flat = pred.permute(0, 2, 3, 1).reshape(-1, 5)
    theirs = MMQualityFocalLoss()(flat, (label.flatten(), score.flatten()), avg_factor=3.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_quality_focal_loss_module_defaults_and_repr():
    module = QualityFocalLoss()
    assert (module.use_sigmoid, module.beta, module.reduction, module.loss_weight, module.activated) == (
        True,
        2.0,
        "mean",
        1.0,
        False,
    )
    assert "beta=2.0" in repr(module) and "loss_weight=1.0" in repr(module)
    with pytest.raises(ValueError, match="use_sigmoid"):
        QualityFocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        QualityFocalLoss(reduction="avg")
    pred, label, score, _ = _qfl_inputs(make_generator("nn-qfl-bad"))
    with pytest.raises(ValueError, match="reduction_override"):
        module(pred, (label, score), reduction_override="max")
    with pytest.raises(TypeError, match=r"\(label, score\)"):
        module(pred, (label, score, score))


# --------------------------------------------------------------------------------------
# DistributionFocalLoss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", CALL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("loss_weight", [0.25, 1.0])
def test_distribution_focal_loss_module_matches_mmdetection(backend, options, loss_weight):
    gen = make_generator("nn-dfl", options, loss_weight)
    pred, target, weight = _dfl_inputs(gen)
    ours = DistributionFocalLoss(loss_weight=loss_weight, backend=backend)
    theirs = MMDistributionFocalLoss(loss_weight=loss_weight)
    kwargs = _call_kwargs(options, weight)
    _assert_same(_value_and_grad(ours, pred, target, **kwargs), _value_and_grad(theirs, pred, target, **kwargs))


@pytest.mark.parametrize("reg_max", [1, 7, 16])
def test_distribution_focal_loss_clamped_targets_ultralytics_and_mmdet(reg_max):
    """Targets clamped as mmdetection (reg_max - 0.1) and ultralytics (reg_max - 1 - 0.01) do."""
    gen = make_generator("nn-dfl-clamp", reg_max)
    pred = torch.randn(10, reg_max + 1, generator=gen, dtype=torch.float64)
    raw = torch.rand(10, generator=gen, dtype=torch.float64) * (reg_max + 2)
    for clamp_max in (reg_max - 0.1, max(reg_max - 1 - 0.01, 0.0)):
        target = raw.clamp(0, clamp_max)
        ours = gfl_ops.distribution_focal_loss(pred, target, reduction="none", backend="native")
        torch.testing.assert_close(ours, mm.distribution_focal_loss(pred, target), rtol=1e-10, atol=1e-12)


def test_distribution_focal_loss_target_at_last_bin():
    """target == n is valid for gfl_ops (bins n-1, n); mmdetection's formula indexes bin n + 1."""
    pred = torch.randn(3, 8, dtype=torch.float64)
    target = torch.full((3,), 7.0, dtype=torch.float64)
    ours = DistributionFocalLoss(reduction="none", backend="native")(pred, target)
    torch.testing.assert_close(ours, -pred.log_softmax(dim=1)[:, 7], rtol=1e-10, atol=1e-12)
    with pytest.raises(IndexError):
        F.cross_entropy(pred, target.long() + 1, reduction="none")  # mmdetection's second call


def test_distribution_focal_loss_module_errors():
    with pytest.raises(ValueError, match="reduction must be one of"):
        DistributionFocalLoss(reduction="avg")
    pred, target, _ = _dfl_inputs(make_generator("nn-dfl-bad"))
    with pytest.raises(ValueError, match="reduction_override"):
        DistributionFocalLoss()(pred, target, reduction_override="max")
    bad = target.clone()
    bad[0] = 17.5
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        DistributionFocalLoss()(pred, bad)
    # validate=False: the kernel clamps instead.
    clamped = DistributionFocalLoss(validate=False, reduction="none", backend="native")(pred, bad)
    torch.testing.assert_close(
        clamped, mm.distribution_focal_loss(pred, bad.clamp(max=16.0 - 1e-12)), rtol=1e-9, atol=1e-9
    )


# --------------------------------------------------------------------------------------
# Integral
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg_max", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_integral_module_matches_mmdetection(backend, reg_max, dtype):
    gen = make_generator("nn-integral", reg_max, dtype)
    x = (torch.randn(5, 4 * (reg_max + 1), generator=gen, dtype=torch.float64) * 2).to(dtype)
    ours = Integral(reg_max=reg_max, backend=backend)
    theirs = MMIntegral(reg_max=reg_max)
    a, b = _value_and_grad(ours, x), _value_and_grad(theirs, x)
    assert a[0].shape == (5, 4) and a[0].dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)


def test_integral_module_errors_and_repr():
    with pytest.raises(ValueError, match="reg_max must be >= 1"):
        Integral(reg_max=0)
    with pytest.raises(ValueError, match="not a multiple of reg_max"):
        Integral(reg_max=16)(torch.randn(3, 4 * 17 + 1))
    assert "reg_max=16" in repr(Integral())


def test_module_losses_are_differentiable_end_to_end():
    """A head, GFL-style: QFL on the logits, DFL + integral on the box distribution."""
    gen = make_generator("nn-e2e")
    cls = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    reg = torch.randn(6, 4 * 8, generator=gen, dtype=torch.float64, requires_grad=True)
    label = torch.tensor([0, 3, 2, 3, 1, 3])
    score = torch.rand(6, generator=gen, dtype=torch.float64)
    target = torch.rand(24, generator=gen, dtype=torch.float64) * 6.9

    def total(qfl, dfl, integral):
        return (
            qfl(cls, (label, score), avg_factor=3.0)
            + dfl(reg.reshape(-1, 8), target, avg_factor=4.0)
            + integral(reg).sum()
        )

    ours = total(
        QualityFocalLoss(backend="native"),
        DistributionFocalLoss(backend="native"),
        Integral(reg_max=7, backend="native"),
    )
    theirs = total(MMQualityFocalLoss(), MMDistributionFocalLoss(), MMIntegral(reg_max=7))
    g_ours = torch.autograd.grad(ours, (cls, reg))
    g_theirs = torch.autograd.grad(theirs, (cls, reg))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# FocalLoss and VarifocalLoss against mmdetection-style eager code (mmdet_formulas.focal_loss,
# varifocal_loss: mmdetection 3.3.0's py_sigmoid_focal_loss and varifocal_loss)
# --------------------------------------------------------------------------------------


def _labels_and_weights(gen, n=24, c=7):
    pred = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    label = torch.randint(0, c + 3, (n,), generator=gen)  # background: C and above
    label[label > c] = c
    return (
        pred,
        label,
        torch.rand(n, generator=gen, dtype=torch.float64),
        torch.rand(n * c, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options", [dict(), dict(avg_factor=5.0), dict(reduction_override="sum"), dict(reduction_override="none")], ids=str
)
@pytest.mark.parametrize("weighting", ["none", "anchor", "flat_element"])
def test_focal_loss_module_matches_mmdetection(backend, options, weighting):
    gen = make_generator("nn-focal", options, weighting)
    pred, label, anchor_weight, flat_weight = _labels_and_weights(gen)
    weight = {"none": None, "anchor": anchor_weight, "flat_element": flat_weight}[weighting]
    module = gfl_ops.nn.FocalLoss(gamma=2.0, alpha=0.25, loss_weight=0.5, backend=backend)
    leaf, leaf_mm = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = module(leaf, label, weight=weight, **options)
    reduction = options.get("reduction_override", "mean")
    mm_weight = None if weight is None else weight.view(pred.shape) if weighting == "flat_element" else weight
    expected = 0.5 * mm.focal_loss(
        leaf_mm,
        label,
        alpha=0.25,
        gamma=2.0,
        weight=mm_weight,
        reduction=reduction,
        avg_factor=options.get("avg_factor"),
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    (grad_mm,) = torch.autograd.grad(expected.sum(), leaf_mm)
    torch.testing.assert_close(grad, grad_mm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_weighted", [True, False])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_varifocal_loss_module_matches_mmdetection(backend, iou_weighted, gamma):
    gen = make_generator("nn-varifocal", iou_weighted, gamma)
    pred = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)  # a (B, C, H, W) head output, in place
    target = torch.rand(pred.shape, generator=gen, dtype=torch.float64) * (torch.rand(pred.shape, generator=gen) < 0.3)
    module = gfl_ops.nn.VarifocalLoss(alpha=0.75, gamma=gamma, iou_weighted=iou_weighted, backend=backend)
    leaf, leaf_mm = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = module(leaf, target, avg_factor=7.0)
    expected = mm.varifocal_loss(leaf_mm, target, alpha=0.75, gamma=gamma, iou_weighted=iou_weighted, avg_factor=7.0)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, leaf)
    (grad_mm,) = torch.autograd.grad(expected, leaf_mm)
    torch.testing.assert_close(grad, grad_mm, rtol=1e-10, atol=1e-12)


def test_varifocal_loss_module_takes_label_score_pairs():
    """(label, score), as a list or a tuple, equals the dense target built from them when no
    positive has score 0 (where the two forms' positives rules differ)."""
    gen = make_generator("nn-varifocal-pairs")
    pred, label, score, _ = _labels_and_weights(gen)
    score = score.clamp_min(0.05)
    module = gfl_ops.nn.VarifocalLoss(detach_weight=True, backend="native")
    dense = gfl_ops.reference.dense_target_from_labels(pred, label, score)
    for target in ((label, score), [label, score]):
        torch.testing.assert_close(module(pred, target), module(pred, dense), rtol=1e-12, atol=0)


def test_focal_family_module_defaults_and_repr():
    focal, varifocal = gfl_ops.nn.FocalLoss(), gfl_ops.nn.VarifocalLoss()
    assert (focal.gamma, focal.alpha, focal.reduction, focal.loss_weight) == (2.0, 0.25, "mean", 1.0)
    assert (varifocal.alpha, varifocal.gamma, varifocal.iou_weighted, varifocal.detach_weight) == (
        0.75,
        2.0,
        True,
        False,
    )
    assert "gamma=2.0, alpha=0.25" in repr(focal) and "iou_weighted=True" in repr(varifocal)
    with pytest.raises(ValueError, match="reduction_override must be None or one of"):
        focal(torch.randn(2, 3), torch.tensor([0, 3]), reduction_override="avg")


def test_integral_keeps_mmdetections_project_buffer():
    """A stock GFLHead checkpoint holds integral.project: the module must have it to load strictly."""
    integral = gfl_ops.nn.Integral(reg_max=7)
    state = integral.state_dict()
    assert list(state) == ["project"]
    torch.testing.assert_close(state["project"], torch.arange(8, dtype=torch.float32))
    integral.load_state_dict({"project": torch.linspace(0, 7, 8)}, strict=True)


def test_dfloss_names_its_bins_and_checks_them():
    with pytest.raises(TypeError):
        gfl_ops.nn.DFLoss()
    with pytest.raises(ValueError, match="num_bins must be >= 2"):
        gfl_ops.nn.DFLoss(num_bins=1)
    with pytest.raises(ValueError, match="must hold num_bins = 16 bins"):
        gfl_ops.nn.DFLoss(num_bins=16)(torch.randn(8, 17), torch.rand(2, 4))
