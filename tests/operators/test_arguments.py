"""Arguments of the public functions and modules: what is accepted (numbers of any kind,
tensors where a detection head has them) and what is refused before any kernel runs, with
an error naming the argument."""

import numpy as np
import pytest
import torch

import gfl_ops
from gfl_ops import _checks
from _helpers import requires_cuda

PRED = torch.randn(6, 5)
LABEL = torch.tensor([0, 1, 5, 2, -1, 4])
SCORE = torch.rand(6)
BINS = torch.randn(6, 17)
DFL_TARGET = torch.rand(6) * 16


def _qfl(**kwargs):
    return gfl_ops.quality_focal_loss(PRED, LABEL, SCORE, **kwargs)


@pytest.mark.parametrize("beta", [np.float64(1.5), np.float32(1.5), np.int64(2), 2, 1.5])
def test_beta_of_any_real_number_type(beta):
    torch.testing.assert_close(_qfl(beta=beta), _qfl(beta=float(beta)))


@pytest.mark.parametrize("beta", [True, "2", -1.0, float("nan"), float("inf"), 1e39, torch.tensor(2.0)])
def test_bad_beta_is_refused(beta):
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        _qfl(beta=beta)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        gfl_ops.quality_focal_loss_dense(PRED, torch.rand(6, 5), beta=beta)


def test_the_largest_float32_beta_is_accepted_by_the_kernels():
    """The direct kernel refuses what does not fit float32, as the public function does."""
    largest = float(torch.finfo(torch.float32).max)
    torch.ops.gfl_ops._quality_focal_loss_native(PRED, LABEL, SCORE, None, None, largest, False, "none", False)
    with pytest.raises(RuntimeError, match="beta must be finite"):
        torch.ops.gfl_ops._quality_focal_loss_native(PRED, LABEL, SCORE, None, None, 1e39, False, "none", False)


@pytest.mark.parametrize("activated", [1, "yes", None])
def test_activated_must_be_a_bool(activated):
    with pytest.raises(TypeError, match="activated must be True or False"):
        _qfl(activated=activated)


@pytest.mark.parametrize("avg_factor", ["3", [3.0], True, torch.tensor(True)])
def test_avg_factor_of_a_wrong_type_is_refused_before_the_kernel(avg_factor, monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(gfl_ops._ops, "operator", lambda name, backend: no_kernel)
    with pytest.raises(TypeError, match="avg_factor must be"):
        _qfl(avg_factor=avg_factor)


@pytest.mark.parametrize("avg_factor", [np.float32(3.0), 3, torch.tensor(3.0), torch.tensor([3.0]), torch.tensor(3)])
def test_avg_factor_as_a_number_or_a_one_element_tensor(avg_factor):
    """The loss is 0-dim whatever form avg_factor takes."""
    torch.testing.assert_close(_qfl(avg_factor=avg_factor), _qfl(avg_factor=3.0))
    torch.testing.assert_close(_qfl(avg_factor=avg_factor, backend="reference"), _qfl(avg_factor=3.0))


def test_avg_factor_on_another_device_is_refused():
    """A 0-dim avg_factor on another device would move the loss there (meta: no values)."""
    for avg_factor in (torch.tensor(3.0, device="meta"), torch.tensor([3.0], device="meta")):
        with pytest.raises(ValueError, match="avg_factor is on meta but pred is on cpu"):
            _qfl(avg_factor=avg_factor)
        with pytest.raises(ValueError, match="avg_factor is on meta"):
            gfl_ops.distribution_focal_loss(BINS, DFL_TARGET, avg_factor=avg_factor)


@requires_cuda
def test_a_cpu_scalar_avg_factor_serves_cuda_pred():
    """As torch treats a CPU 0-dim tensor as a number: the loss stays on pred's device."""
    pred = PRED.cuda()
    loss = gfl_ops.quality_focal_loss(pred, LABEL.cuda(), SCORE.cuda(), avg_factor=torch.tensor(3.0))
    assert loss.device == pred.device


def test_integral_reg_max_must_be_an_int():
    for reg_max in (16.0, "16", True):
        with pytest.raises(TypeError, match="reg_max must be an int"):
            gfl_ops.nn.Integral(reg_max)
    with pytest.raises(ValueError, match="reg_max must be >= 1"):
        gfl_ops.nn.Integral(0)


MODULE_ARGUMENTS = {
    "qfl_beta": (lambda: gfl_ops.nn.QualityFocalLoss(beta=-1.0), ValueError, "beta must be a finite number"),
    "qfl_backend": (lambda: gfl_ops.nn.QualityFocalLoss(backend="bogus"), ValueError, "backend must be one of"),
    "qfl_reduction": (lambda: gfl_ops.nn.QualityFocalLoss(reduction="avg"), ValueError, "reduction must be one of"),
    "qfl_loss_weight": (
        lambda: gfl_ops.nn.QualityFocalLoss(loss_weight="1"),
        TypeError,
        "loss_weight must be a number",
    ),
    "qfl_activated": (lambda: gfl_ops.nn.QualityFocalLoss(activated=1), TypeError, "activated must be True or False"),
    "qfl_softmax": (lambda: gfl_ops.nn.QualityFocalLoss(use_sigmoid=False), ValueError, "only the sigmoid form"),
    "dfl_backend": (lambda: gfl_ops.nn.DistributionFocalLoss(backend="cuda"), ValueError, "backend must be one of"),
    "dfl_validate": (lambda: gfl_ops.nn.DistributionFocalLoss(validate="yes"), TypeError, "validate must be None"),
    "dfl_loss_weight": (lambda: gfl_ops.nn.DistributionFocalLoss(loss_weight=None), TypeError, "loss_weight"),
    "integral_backend": (lambda: gfl_ops.nn.Integral(backend="gpu"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("name", sorted(MODULE_ARGUMENTS))
def test_module_constructors_refuse_bad_arguments(name):
    """A bad config value fails when the model is built, not at the first training step."""
    build, error, message = MODULE_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        build()


# --------------------------------------------------------------------------------------
# DFL's target range: checked where it costs no device sync, or when asked for
# --------------------------------------------------------------------------------------


def test_dfl_default_checks_the_target_range_of_cpu_tensors():
    with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
        gfl_ops.distribution_focal_loss(BINS, torch.full((6,), 16.5))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 16\]"):
        gfl_ops.nn.DistributionFocalLoss()(BINS, torch.full((6,), float("nan")))


def test_dfl_target_range_is_read_off_cpu_only_when_asked(monkeypatch):
    """validate=None reads no target on another device (on CUDA a read is a host sync);
    validate=True does."""
    reads = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(t.device) or real_aminmax(t))
    meta_target = torch.empty(6, device="meta")
    _checks.validate_dfl_target_range(meta_target, 16, None)
    _checks.validate_dfl_target_range(meta_target, 16, False)
    assert reads == []
    _checks.validate_dfl_target_range(DFL_TARGET, 16, True)
    _checks.validate_dfl_target_range(DFL_TARGET, 16, None)
    assert reads == [torch.device("cpu")] * 2


def test_dfl_out_of_range_target_unchecked_is_clamped():
    """validate=False: the kernels clamp into [0, n] (NaN -> 0) and read nothing out of bounds."""
    target = torch.tensor([-3.0, 16.0, 40.0, float("nan"), float("inf"), 7.5])
    clamped = torch.tensor([0.0, 16.0, 16.0, 0.0, 16.0, 7.5])
    for backend in gfl_ops.available_backends("cpu", "distribution_focal_loss"):
        loss = gfl_ops.distribution_focal_loss(BINS, target, reduction="none", validate=False, backend=backend)
        expected = gfl_ops.reference.distribution_focal_loss_per_row(BINS.double(), clamped.double())
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5, msg=backend)


@requires_cuda
def test_dfl_default_does_not_sync_on_cuda():
    bins = BINS.cuda().requires_grad_()
    target = DFL_TARGET.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gfl_ops.distribution_focal_loss(bins, target, avg_factor=torch.tensor(4.0, device="cuda"))
        loss.backward()
        gfl_ops.nn.DistributionFocalLoss()(bins, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="target must lie in"):
        gfl_ops.distribution_focal_loss(bins, torch.full((6,), 17.0, device="cuda"), validate=True)
