"""Numerics at the edges of the input range, against references computed here.

- QFL with beta near FLT_MAX: |d|^beta is 0 for |d| < 1 (1 at |d| = 1), never NaN, as
  torch's pow in float32.
"""
import pytest
import torch
import torch.nn.functional as F

import gfl_ops
from _helpers import make_generator


# --------------------------------------------------------------------------------------
# QFL with beta near FLT_MAX
# --------------------------------------------------------------------------------------


def _qfl_reference_float32(pred: torch.Tensor, label: torch.Tensor, score: torch.Tensor, beta: float) -> torch.Tensor:
    """torch's own float32 maths: |sigmoid(x) - y|^beta * BCE(x, y), summed over classes."""
    classes = torch.arange(pred.shape[1])
    y = torch.where(label[:, None] == classes[None, :], score[:, None], torch.zeros(()))
    factor = (pred.sigmoid() - y).abs().pow(beta)
    return (factor * F.binary_cross_entropy_with_logits(pred, y, reduction="none")).sum(dim=1)


@pytest.mark.parametrize("beta", [1e38, 3e38], ids=lambda b: f"{b:g}")
def test_qfl_huge_beta(beta):
    """|d|^beta for beta near FLT_MAX: 0 where |d| < 1, 1 where |d| = 1 (a logit far enough
    out that sigmoid is 0 or 1 in float32 with the opposite target), no NaN."""
    gen = make_generator("qfl-huge-beta", beta)
    num_anchors, num_classes = 64, 20
    pred = 3.0 * torch.randn(num_anchors, num_classes, generator=gen)  # no sigmoid rounds to 0 or 1
    pred[:4] = torch.tensor([-200.0, -120.0, 150.0, 300.0])[:, None]  # saturated sigmoid
    label = torch.randint(0, num_classes + 1, (num_anchors,), generator=gen)
    label[:4] = torch.tensor([3, 4, num_classes, num_classes])  # y = 1 on a class of the first two
    score = torch.rand(num_anchors, generator=gen)
    score[:2] = 1.0
    expected = _qfl_reference_float32(pred, label, score, beta)
    assert torch.isfinite(expected).all() and (expected[:2] > 100).all() and (expected[4:] == 0).all()
    loss = gfl_ops.quality_focal_loss(pred, label, score, beta=beta, reduction="none", backend="native")
    assert not loss.isnan().any(), loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Gradient where no sigmoid saturates (where one does, torch's pow backward is inf * 0).
    leaf = pred[4:].clone().requires_grad_()
    gfl_ops.quality_focal_loss(leaf, label[4:], score[4:], beta=beta, reduction="sum", backend="native").backward()
    reference_leaf = pred[4:].clone().requires_grad_()
    _qfl_reference_float32(reference_leaf, label[4:], score[4:], beta).sum().backward()
    assert torch.isfinite(reference_leaf.grad).all()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-5, atol=1e-6)
