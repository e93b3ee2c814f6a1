"""gfl_ops.integrations.ultralytics inside the real ultralytics (the tested release).

Run by .ci/run (make test installs ultralytics); skipped, with the reason, where ultralytics
is absent. Models are built from ultralytics' own yaml files (no weights are downloaded);
the stock and the patched loss see the same model, the same batch and the same weights,
and every loss term and every parameter's gradient are compared.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
import types

import pytest
import torch

from _frameworks import import_framework

pytestmark = pytest.mark.frameworks
import_framework("ultralytics")

from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils import loss as ultralytics_loss  # noqa: E402

import gfl_ops  # noqa: E402
import gfl_ops.integrations.ultralytics as fused_ultralytics  # noqa: E402
from gfl_ops import nn as gfl_ops_nn  # noqa: E402

# Loss terms: sums of ~10^5 float32 terms in another order (a few ulps); gradients relative
# to each parameter's largest, the same. A parameter whose gradient is zero in exact
# arithmetic (a BatchNorm bias that feeds another BatchNorm in training mode) holds rounding
# noise (1e-8 where others reach 5): it is compared relative to 1e-3 of the largest gradient.
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
HYPERPARAMETERS = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)


@pytest.fixture(autouse=True)
def stock_loss_restored():
    yield
    fused_ultralytics.unpatch()


def build_model(config: str, dtype: torch.dtype, num_classes: int = 80) -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel(config, nc=num_classes, verbose=False).to(dtype)
    model.args = HYPERPARAMETERS
    return model


def synthetic_batch(batch_size: int, size: int, dtype: torch.dtype, boxes_per_image: int = 5, num_classes: int = 80):
    generator = torch.Generator().manual_seed(1)
    count = batch_size * boxes_per_image
    centre = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
    extent = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
    return dict(  # labels are float32 whatever the model's dtype, as ultralytics' loader gives them
        img=torch.rand(batch_size, 3, size, size, generator=generator, dtype=dtype),
        batch_idx=torch.arange(batch_size).repeat_interleave(boxes_per_image).float(),
        cls=torch.randint(0, num_classes, (count, 1), generator=generator).float(),
        bboxes=torch.cat([centre, extent], 1),
    )


def loss_and_gradients(model: DetectionModel, batch: dict):
    model.zero_grad()
    model.criterion = None  # built again: the class-level patch applies either way
    loss, items = model.loss(batch, model(batch["img"]))
    loss.sum().backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


def assert_patched_matches_stock(model: DetectionModel, batch: dict, dtype: torch.dtype):
    stock_loss, stock_grads = loss_and_gradients(model, batch)
    with fused_ultralytics.patched():
        fused_loss, fused_grads = loss_and_gradients(model, batch)
    rtol = RTOL[dtype]
    torch.testing.assert_close(fused_loss, stock_loss, rtol=rtol, atol=0)
    assert stock_grads.keys() == fused_grads.keys() and len(stock_grads) > 100
    floor = 1e-3 * max(grad.abs().max() for grad in stock_grads.values())
    for name, grad in stock_grads.items():
        scale = grad.abs().max().clamp(min=floor)
        torch.testing.assert_close(fused_grads[name] / scale, grad / scale, rtol=rtol, atol=rtol, msg=name)
    return stock_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_yolov8n_losses_and_gradients_match_stock(dtype):
    model = build_model("yolov8n.yaml", dtype)
    stock_loss = assert_patched_matches_stock(model, synthetic_batch(2, 256, dtype), dtype)
    assert (stock_loss > 0).all()  # box, cls and DFL all present


def test_yolov8n_sgd_steps_stay_with_stock():
    """Three SGD steps from the same weights, stock and patched: the losses of every step and
    the weights after them agree. The task-aligned assignment makes training sensitive to
    rounding (its top-k flips): stock against itself, weights perturbed by 1e-7, differs by
    2e-5 after three steps at this learning rate (5e-4 at lr = 0.01), hence rtol 5e-5."""
    import copy

    stock_model = build_model("yolov8n.yaml", torch.float32)
    fused_model = copy.deepcopy(stock_model)
    batch = synthetic_batch(2, 192, torch.float32)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (stock_model, fused_model)]
    for _ in range(3):
        losses = []
        for model, optimizer, fused in zip((stock_model, fused_model), optimizers, (False, True)):
            optimizer.zero_grad()
            with fused_ultralytics.patched() if fused else contextlib.nullcontext():
                loss, _ = model.loss(batch, model(batch["img"]))
            loss.sum().backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=5e-5, atol=0)
    for (name, a), (_, b) in zip(stock_model.named_parameters(), fused_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_yolov8n_class_weights_and_an_image_without_boxes():
    model = build_model("yolov8n.yaml", torch.float32, num_classes=7)
    model.class_weights = torch.linspace(0.5, 2.0, 7)
    batch = synthetic_batch(3, 192, torch.float32, num_classes=7)
    keep = batch["batch_idx"] != 1  # image 1 has no boxes
    batch.update({key: batch[key][keep] for key in ("batch_idx", "cls", "bboxes")})
    assert_patched_matches_stock(model, batch, torch.float32)


def test_empty_foreground_keeps_the_box_branch_in_the_graph():
    model = build_model("yolov8n.yaml", torch.float32)
    batch = synthetic_batch(2, 128, torch.float32)
    batch.update(batch_idx=batch["batch_idx"][:0], cls=batch["cls"][:0], bboxes=batch["bboxes"][:0])
    stock_loss = assert_patched_matches_stock(model, batch, torch.float32)
    assert stock_loss[0] == 0 and stock_loss[2] == 0


@pytest.mark.parametrize("config,criterion,bins", [
    ("yolov10n.yaml", ultralytics_loss.E2ELoss, 16),  # one-to-many and one-to-one v8DetectionLoss
    ("yolo11n.yaml", ultralytics_loss.v8DetectionLoss, 16),
    ("yolo26n.yaml", ultralytics_loss.E2ELoss, 1),  # reg_max = 1: L1 boxes (stock), fused BCE
])  # fmt: skip
def test_other_yolo_families_match_stock(config, criterion, bins):
    model = build_model(config, torch.float32)
    assert type(model.init_criterion()) is criterion and model.model[-1].reg_max == bins
    assert_patched_matches_stock(model, synthetic_batch(2, 192, torch.float32), torch.float32)


def test_patch_and_unpatch_restore_the_stock_method_exactly():
    stock = ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss
    assert not fused_ultralytics.is_patched()
    fused_ultralytics.patch()
    fused_ultralytics.patch()
    assert fused_ultralytics.is_patched()
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is not stock
    fused_ultralytics.unpatch()
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is stock
    with fused_ultralytics.patched():
        assert fused_ultralytics.is_patched()
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is stock


def test_patch_refuses_an_untested_release_or_changed_code(monkeypatch):
    tested = fused_ultralytics.TESTED_SOURCES
    version = fused_ultralytics.ULTRALYTICS_VERSION
    monkeypatch.setattr(fused_ultralytics, "TESTED_SOURCES", {"0.0.1": tested[version]})
    with pytest.raises(RuntimeError, match="not a tested release"):
        fused_ultralytics.patch()
    changed = dict(tested[version], **{"BboxLoss.forward": "0" * 64})
    monkeypatch.setattr(fused_ultralytics, "TESTED_SOURCES", {version: changed})
    with pytest.raises(RuntimeError, match="BboxLoss.forward differ"):
        fused_ultralytics.patch()
    assert not fused_ultralytics.is_patched()


@pytest.mark.parametrize("mirrored", ["BboxLoss.forward", "v8DetectionLoss.get_assigned_targets_and_loss"])
def test_patch_refuses_a_wrapped_mirrored_function(monkeypatch, mirrored):
    """A functools.wraps wrapper shows the wrapped function's source to inspect.getsource:
    patch() must refuse it rather than accept the digest and skip the wrapper."""
    owner, attribute = mirrored.split(".")
    owner_class = getattr(ultralytics_loss, owner)
    original = owner_class.__dict__[attribute]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return original(*args, **kwargs)

    monkeypatch.setattr(owner_class, attribute, wrapper)
    with pytest.raises(RuntimeError, match=f"{mirrored} is wrapped"):
        fused_ultralytics.patch()
    assert not fused_ultralytics.is_patched()
    assert owner_class.__dict__[attribute] is wrapper


def test_unpatch_restores_the_method_that_was_in_place_before_patch(monkeypatch):
    """A third party's copy of the stock method (same code, another object) installed before
    patch() is what unpatch() puts back, not ultralytics' original."""
    stock = ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss
    third_party = types.FunctionType(
        stock.__code__, stock.__globals__, stock.__name__, stock.__defaults__, stock.__closure__
    )
    monkeypatch.setattr(ultralytics_loss.v8DetectionLoss, "get_assigned_targets_and_loss", third_party)
    fused_ultralytics.patch()
    assert fused_ultralytics.is_patched()
    fused_ultralytics.unpatch()
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is third_party
    with fused_ultralytics.patched():
        assert fused_ultralytics.is_patched()
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is third_party


def test_overlapping_patched_blocks_in_two_threads_unpatch_when_the_last_exits():
    """Thread A opens a block, B opens one, A exits: B must still run patched; the stock
    method returns when B exits."""
    stock = ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss
    a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def thread_a():
        with fused_ultralytics.patched():
            a_entered.set()
            b_entered.wait(10)
        a_exited.set()

    def thread_b():
        a_entered.wait(10)
        with fused_ultralytics.patched():
            b_entered.set()
            a_exited.wait(10)
            seen_by_b.append(fused_ultralytics.is_patched())

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen_by_b == [True], "the first block's exit unpatched the second, still open"
    assert ultralytics_loss.v8DetectionLoss.get_assigned_targets_and_loss is stock


def test_a_block_inside_an_explicit_patch_leaves_it_patched():
    fused_ultralytics.patch()
    with fused_ultralytics.patched():
        pass
    assert fused_ultralytics.is_patched()


def test_rtdetr_varifocal_loss_is_the_differentiated_weight_form():
    """ultralytics' RT-DETR criterion (DETRLoss with vfl) differentiates its varifocal
    weight: gfl_ops' detach_weight=False matches it, values and gradients; the detached form
    (the official RT-DETR, D-FINE and DEIM criteria) does not."""
    batch, queries, classes = 2, 6, 5
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(batch, queries, classes, generator=generator)
    labels = torch.randint(0, classes + 1, (batch, queries), generator=generator)  # classes: background
    scores = torch.rand(batch, queries, generator=generator)
    one_hot = torch.nn.functional.one_hot(labels, classes + 1)[..., :-1]
    stock_pred = logits.clone().requires_grad_()
    stock = ultralytics_loss.VarifocalLoss()(stock_pred, scores[..., None] * one_hot, one_hot)
    stock.backward()
    gradients = {}
    for detach_weight in (False, True):
        pred = logits.clone().requires_grad_()
        elementwise = gfl_ops.varifocal_loss(
            pred.view(-1, classes), (labels.view(-1), scores.view(-1)), detach_weight=detach_weight, reduction="none"
        )
        loss = elementwise.view(batch, queries, classes).mean(1).sum()
        loss.backward()
        gradients[detach_weight] = pred.grad
        torch.testing.assert_close(loss, stock, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradients[False], stock_pred.grad, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(gradients[True], stock_pred.grad, rtol=1e-2, atol=1e-4)


def write_synthetic_dataset(root, images: int = 8, size: int = 64) -> str:
    """A YOLO-format dataset of random images with one box each."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "labels" / split)
        for index in range(images):
            pixels = generator.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{index}.png")
            cx, cy, w, h = generator.uniform(0.3, 0.7), generator.uniform(0.3, 0.7), *generator.uniform(0.1, 0.4, 2)
            (root / "labels" / split / f"{index}.txt").write_text(f"{index % 2} {cx} {cy} {w} {h}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return str(data)


def test_detection_trainer_trains_patched_and_its_checkpoint_loads_in_a_fresh_process(tmp_path, monkeypatch):
    from ultralytics import YOLO

    fused_calls = []
    fused_bce = fused_ultralytics.functional.quality_focal_loss_dense
    monkeypatch.setattr(
        fused_ultralytics.functional,
        "quality_focal_loss_dense",
        lambda *args, **kwargs: fused_calls.append(1) or fused_bce(*args, **kwargs),
    )
    data = write_synthetic_dataset(tmp_path / "data")
    with fused_ultralytics.patched():
        model = YOLO("yolov8n.yaml")
        model.train(
            data=data,
            epochs=2,
            imgsz=64,
            batch=4,
            workers=0,
            device="cpu",
            plots=False,
            amp=False,
            project=str(tmp_path / "runs"),
            name="train",
            exist_ok=True,
            verbose=False,
            seed=0,
        )
        trainer_losses = torch.stack(list(model.trainer.tloss.values()))
    assert torch.isfinite(trainer_losses).all() and (trainer_losses > 0).all()
    assert len(fused_calls) >= 4  # 2 epochs x 2 batches trained on the fused loss (and validation)
    checkpoint = tmp_path / "runs" / "train" / "weights" / "last.pt"
    assert checkpoint.exists()
    # A process that never imports gfl_ops loads it and runs it.
    script = (
        "import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); "
        "import torch; m.model.float().eval()(torch.zeros(1, 3, 64, 64)); "
        "assert 'gfl_ops' not in sys.modules; print('loaded', type(m.model).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, YOLO_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded DetectionModel" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dfloss_module_matches_ultralytics_dfloss(dtype):
    """gfl_ops.nn.DFLoss(num_bins=16) against ultralytics' DFLoss(reg_max=16), as BboxLoss
    calls it: (M * 4, 16) logits, (M, 4) targets, (M, 1) out; targets at and beyond the
    clamp included, and not modified (ultralytics clamps its argument in place)."""
    generator = torch.Generator().manual_seed(4)
    pred = torch.randn(24, 16, generator=generator, dtype=dtype, requires_grad=True)
    target = (torch.rand(6, 4, generator=generator, dtype=dtype) * 16.5).clamp(max=15.0)
    target[0] = torch.tensor([0.0, 14.99, 15.0, 7.5], dtype=dtype)
    kept = target.clone()
    fused = gfl_ops_nn.DFLoss(num_bins=16)(pred, target)
    assert torch.equal(target, kept)
    stock = ultralytics_loss.DFLoss(reg_max=16)(pred, target.clone())
    torch.testing.assert_close(fused, stock.to(fused.dtype), rtol=RTOL[dtype], atol=RTOL[dtype])
    (fused_grad,) = torch.autograd.grad(fused.sum(), pred)
    (stock_grad,) = torch.autograd.grad(stock.sum(), pred)
    torch.testing.assert_close(fused_grad, stock_grad, rtol=RTOL[dtype], atol=RTOL[dtype])
    assert gfl_ops_nn.DFLoss(num_bins=16).reg_max == 16
