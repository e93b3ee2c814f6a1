"""python -m gfl_ops verify: it passes on this machine, and it fails (exit code 1, FAIL rows)
when a backend's gradient is wrong."""

import pytest
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
        (["--backends", "nativ"], "argument --backends: invalid choice: 'nativ'"),
        *(
            [(["--device", "cuda"], "argument --device: 'cuda': no CUDA device is available here")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        verify.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_a_named_backend_that_is_not_available_is_said(capsys):
    """--backends triton where Triton does not run: said, not 'no backend available'."""
    if "triton" in gfl_ops.available_backends("cpu"):
        pytest.skip("Triton runs on CPU tensors here (TRITON_INTERPRET=1)")
    with pytest.raises(SystemExit) as raised:
        verify.main(["--device", "cpu", "--backends", "triton"])
    assert raised.value.code == 2
    assert "argument --backends: triton not available on cpu" in capsys.readouterr().err
