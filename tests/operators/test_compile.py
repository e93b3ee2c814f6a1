"""torch.compile(fullgraph=True) of a small GFL training step with backend="native".

One compiled function holds a tiny detection head (two 1x1 convolutions), the public
functions and the nn modules; its loss and the gradients of every parameter and input
must equal eager execution. Compiles are slow on small CI machines: two in all.
"""

import pytest
import torch

import gfl_ops
from _helpers import DEVICES, make_generator

NUM_CLASSES = 5
REG_MAX = 7
BINS = REG_MAX + 1


class TinyHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls = torch.nn.Conv2d(4, NUM_CLASSES, 1)
        self.reg = torch.nn.Conv2d(4, 4 * BINS, 1)
        self.loss_cls = gfl_ops.nn.QualityFocalLoss(beta=2.0, loss_weight=1.0, backend="native")
        self.loss_dfl = gfl_ops.nn.DistributionFocalLoss(loss_weight=0.25, backend="native")
        self.integral = gfl_ops.nn.Integral(reg_max=REG_MAX, backend="native")
        self.loss_focal = gfl_ops.nn.FocalLoss(gamma=2.0, alpha=0.25, backend="native")
        self.loss_varifocal = gfl_ops.nn.VarifocalLoss(alpha=0.75, gamma=2.0, backend="native")

    def forward(self, features, labels, scores, soft_target, pos_index, dfl_target, num_pos):
        cls_score = self.cls(features)  # (B, C, H, W), read in place
        reg = self.reg(features).permute(0, 2, 3, 1).reshape(-1, 4 * BINS)
        pos_reg = reg[pos_index]  # (P, 4 * BINS)
        bins = pos_reg.reshape(-1, BINS)  # (4P, BINS)
        weight = cls_score.detach().sigmoid().amax(dim=1).flatten()[pos_index].repeat_interleave(4)

        losses = {
            # Functional API.
            "qfl": gfl_ops.quality_focal_loss(cls_score, labels, scores, avg_factor=num_pos, backend="native"),
            "qfl_dense": gfl_ops.quality_focal_loss_dense(
                cls_score, soft_target, beta=0.0, reduction="sum", backend="native"
            )
            / soft_target.sum().clamp_min(1.0),
            "dfl": gfl_ops.distribution_focal_loss(bins, dfl_target, weight=weight, avg_factor=4.0, backend="native"),
            "integral": gfl_ops.distribution_integral(bins, backend="native").mean(),
            "focal": gfl_ops.sigmoid_focal_loss(cls_score, labels, avg_factor=num_pos, backend="native"),
            "varifocal": gfl_ops.varifocal_loss(
                cls_score, (labels, scores), gamma=1.5, detach_weight=True, reduction="sum", backend="native"
            ),
            # Modules.
            "m_qfl": self.loss_cls(cls_score, (labels, scores), avg_factor=num_pos),
            "m_qfl_dense": self.loss_cls(cls_score, soft_target, reduction_override="sum"),
            "m_dfl": self.loss_dfl(bins, dfl_target, weight=weight, avg_factor=4.0),
            "m_integral": self.integral(pos_reg).sum(),
            "m_focal": self.loss_focal(cls_score, labels, avg_factor=num_pos),
            "m_varifocal": self.loss_varifocal(cls_score, soft_target, weight=scores),
        }
        return sum(losses.values()), losses


def _inputs(device, gen, batch=2, height=3, width=4):
    features = torch.randn(batch, 4, height, width, generator=gen).to(device)
    labels = torch.randint(-1, NUM_CLASSES + 1, (batch, height, width), generator=gen).to(device)
    scores = torch.rand(batch, height, width, generator=gen).to(device)
    soft_target = (torch.rand(batch, NUM_CLASSES, height, width, generator=gen) * 0.9).to(device)
    pos_index = torch.tensor([0, 3, 5, 10, 17], device=device)
    dfl_target = (torch.rand(4 * len(pos_index), generator=gen) * (REG_MAX - 0.1)).to(device)
    num_pos = torch.tensor(5.0, device=device)
    return features, labels, scores, soft_target, pos_index, dfl_target, num_pos


class RecordingBackend:
    """A torch.compile backend that records the operators of the Dynamo graph, then hands it
    to Inductor: the compiled step must call the native operators, not a fallback."""

    def __init__(self):
        self.targets = set()
        self.graphs = 0  # Dynamo graphs compiled (recompilations included)

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        for node in gm.graph.nodes:
            if node.op == "call_function":
                self.targets.add(str(node.target))
        return compile_fx(gm, example_inputs)


def _step(model, inputs):
    features = inputs[0].detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    total, losses = model(features, *inputs[1:])
    total.backward()
    grads = {name.replace("_orig_mod.", ""): p.grad.clone() for name, p in model.named_parameters()}
    grads["features"] = features.grad.clone()
    return total.detach(), {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_equals_eager(device):
    torch._dynamo.reset()
    gen = make_generator("compile")
    torch.manual_seed(0)
    model = TinyHead().to(device)
    inputs = _inputs(device, gen)

    eager_total, eager_losses, eager_grads = _step(model, inputs)
    backend = RecordingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    compiled_total, compiled_losses, compiled_grads = _step(compiled, inputs)

    for op in gfl_ops._ops.OPERATORS:
        native = gfl_ops._ops.operator(op, "native")  # gfl_ops.<op> (or the emulated CUDA one)
        assert {str(native), str(native.default)} & backend.targets, (op, sorted(backend.targets))
    assert torch.isfinite(eager_total)
    for name in eager_losses:
        torch.testing.assert_close(compiled_losses[name], eager_losses[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled_total, eager_total, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        assert eager_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)

    # The module form equals the functional form (same kernels, same reductions).
    torch.testing.assert_close(eager_losses["m_qfl"], eager_losses["qfl"])
    torch.testing.assert_close(eager_losses["m_dfl"], 0.25 * eager_losses["dfl"])
    torch.testing.assert_close(eager_losses["m_focal"], eager_losses["focal"])

    # A second step with new values of the same shapes reuses the compiled graph.
    inputs2 = _inputs(device, gen)
    eager2 = _step(model, inputs2)[0]
    compiled2 = _step(compiled, inputs2)[0]
    torch.testing.assert_close(compiled2, eager2, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_losses_on_half_channels_last_logits(device):
    """float16 channels-last logits and the no-grad path (pred not requiring grad) under compile."""
    torch._dynamo.reset()
    gen = make_generator("compile-half")
    pred = torch.randn(2, 3, 4, NUM_CLASSES, generator=gen).half().to(device).permute(0, 3, 1, 2)
    labels = torch.randint(0, NUM_CLASSES + 1, (2, 3, 4), generator=gen).to(device)
    scores = torch.rand(2, 3, 4, generator=gen).to(device)

    def loss_fn(p):
        per_anchor = gfl_ops.quality_focal_loss(p, labels, scores, reduction="none", backend="native")
        return per_anchor, per_anchor.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    with torch.no_grad():
        eager_none, _ = loss_fn(pred)
        compiled_none, _ = compiled(pred)
    torch.testing.assert_close(compiled_none, eager_none)
    assert compiled_none.dtype == torch.float32

    leaf_e = pred.detach().requires_grad_()
    leaf_c = pred.detach().requires_grad_()
    _, total_e = loss_fn(leaf_e)
    _, total_c = compiled(leaf_c)
    (grad_e,) = torch.autograd.grad(total_e, leaf_e)
    (grad_c,) = torch.autograd.grad(total_c, leaf_c)
    torch.testing.assert_close(total_c, total_e)
    assert grad_c.dtype == torch.float16
    torch.testing.assert_close(grad_c, grad_e)
    torch._dynamo.reset()


def test_compiled_autograd_traces_the_native_backward():
    """torch._dynamo.compiled_autograd traces the C++ backward of the native operators
    (it refuses autograd Functions with non-differentiable outputs)."""
    import torch._dynamo.compiled_autograd as compiled_autograd

    gen = make_generator("compiled-autograd")
    pred = torch.randn(64, 80, generator=gen, requires_grad=True)
    label = torch.randint(0, 90, (64,), generator=gen)
    score = torch.rand(64, generator=gen)
    bins = torch.randn(32, 17, generator=gen, requires_grad=True)
    target = torch.rand(32, generator=gen) * 16

    def step():
        qfl = gfl_ops.quality_focal_loss(pred, label, score, backend="native")
        dfl = gfl_ops.distribution_focal_loss(bins, target, avg_factor=8.0, backend="native")
        (qfl + 0.25 * dfl).backward()
        grads = pred.grad, bins.grad
        pred.grad = bins.grad = None
        return grads

    expected = step()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        got = step()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
def test_compiled_losses_with_dynamic_shapes(set_gradient_pass, gradient_pass):
    """torch.compile(dynamic=True, fullgraph=True): symbolic sizes (and floats) through the
    argument checks, the fake kernels and both backward formulas; no recompilation for a new N."""
    set_gradient_pass("cpu", gradient_pass)
    torch._dynamo.reset()
    gen = make_generator("dynamic", gradient_pass)

    def loss_fn(pred, label, score, bins, target):
        qfl = gfl_ops.quality_focal_loss(pred, label, score, avg_factor=4.0, backend="native")
        dfl = gfl_ops.distribution_focal_loss(bins, target, validate=False, backend="native")
        focal = gfl_ops.sigmoid_focal_loss(pred, label, gamma=1.5, backend="native")
        # Elementwise "none": an incoming gradient of pred's shape in both gradient passes.
        varifocal = gfl_ops.varifocal_loss(pred, (label, score), reduction="none", backend="native")
        return qfl + 0.25 * dfl + focal + (varifocal * varifocal.detach()).mean()

    backend = RecordingBackend()
    compiled = torch.compile(loss_fn, dynamic=True, fullgraph=True, backend=backend)
    graphs_of_the_first_size = None
    # No on-disk compile caches: an entry cached by a static compile of the same graph
    # elsewhere in the suite specialises the sizes when it is reused. The config modules'
    # own patch() restores each setting (pytest 9.2's monkeypatch undoes with delattr,
    # after which torch's config modules hide the setting from every later test).
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        # Every N x 80 above 4096: Inductor's CPU reduction of varifocal's N x C loss guards
        # on that size (need_use_acc_helper), a recompilation of its own, not of the operators.
        for n in (64, 80, 96):
            pred = torch.randn(n, 80, generator=gen, requires_grad=True)
            bins = torch.randn(n, 17, generator=gen, requires_grad=True)
            args = (torch.randint(0, 90, (n,), generator=gen), torch.rand(n, generator=gen))
            target = torch.rand(n, generator=gen) * 16
            grads = []
            for fn in (compiled, loss_fn):
                fn(pred, *args, bins, target).backward()
                grads.append((pred.grad, bins.grad))
                pred.grad = bins.grad = None
            for got, expected in zip(*grads):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            graphs_of_the_first_size = graphs_of_the_first_size or backend.graphs
    assert backend.graphs == graphs_of_the_first_size, "recompiled for a new N"
    torch._dynamo.reset()
