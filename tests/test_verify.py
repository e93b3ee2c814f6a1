"""python -m gfl_ops verify: it passes on this machine, and it fails (exit code 1, FAIL rows)
when a backend's gradient is wrong."""
import torch

import gfl_ops
from gfl_ops import verify


def test_verify_passes_for_the_native_backend(capsys):
    assert verify.main(["--device", "cpu", "--backends", "native"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    for op in ("qfl", "qfl_prob", "qfl_dense", "dfl", "integral"):
        assert f"\n{op} " in out
    assert " 0 failed" in out


def test_verify_reports_a_wrong_gradient(monkeypatch, capsys):
    """A native DFL whose gradient is 0.1% off: gradcheck and parity must both fail it."""
    kernel = torch.ops.gfl_ops._distribution_focal_loss_native

    def operator(name, backend):
        if name == "distribution_focal_loss" and backend == "native":
            return lambda pred, target, weight, reduction, backend: _SkewedDfl.apply(pred, target, weight, reduction)
        return original(name, backend)

    class _SkewedDfl(torch.autograd.Function):
        @staticmethod
        def forward(ctx, pred, target, weight, reduction):
            loss, grad = kernel(pred.detach(), target, weight, reduction, True)
            ctx.save_for_backward(grad)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            (grad,) = ctx.saved_tensors
            scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1)
            return grad * scale * 1.001, None, None, None

    original = gfl_ops._ops.operator
    monkeypatch.setattr(gfl_ops._ops, "operator", operator)
    assert verify.main(["--device", "cpu", "--backends", "native"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert failed and all(line.startswith("dfl ") for line in failed), failed
    assert any("gradcheck" in line for line in failed) and any("parity" in line for line in failed)
