"""gfl_ops.integrations.mmdet inside the real mmdetection 3.3.0 (with mmengine and mmcv).

Run by .ci/run (make test installs the frameworks); skipped, with the reason, where
mmdetection is absent. mmcv built without its compiled ops gets a stand-in for mmcv.ops
(tools/mmcv_ops_standin.py): mmdetection imports it for NMS and other ops that
the losses never call.

Parity: each head (GFLHead, TOODHead in both its phases) and the whole GFL detector of
configs/gfl/gfl_r50_fpn_1x_coco.py is built twice from the same config, stock and with
the fused classes (stock names opted in), the fused one loading the stock one's
state_dict strictly; then every loss term and every parameter's gradient are compared, in
float32: mmdetection's anchor generators and target assignment are float32 only (a
float64 head fails inside the stock GFLHead's _get_targets_single).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from _frameworks import import_framework
from tools import mmcv_ops_standin

mmcv_ops_standin.install()
pytestmark = pytest.mark.frameworks
mmdet = import_framework("mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.models.losses import DistributionFocalLoss, FocalLoss, QualityFocalLoss, VarifocalLoss  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import gfl_ops.integrations.mmdet as fused_mmdet  # noqa: E402

register_all_modules()
CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")
STOCK_CLASSES = {
    "QualityFocalLoss": QualityFocalLoss,
    "DistributionFocalLoss": DistributionFocalLoss,
    "FocalLoss": FocalLoss,
    "VarifocalLoss": VarifocalLoss,
}
# fp32 sums of ~10^4 terms in another order: a few float32 ulps of the loss, relative.
FP32_RTOL = {torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def stock_names_restored():
    yield
    fused_mmdet.restore_stock_losses()


def model_config(name: str) -> Config:
    return Config.fromfile(os.path.join(CONFIGS, name)).model


def head_config(name: str, channels: int = 32) -> dict:
    model = model_config(name)
    head = copy.deepcopy(model.bbox_head)
    head.update(in_channels=channels, feat_channels=channels, train_cfg=model.train_cfg)
    return head


def build_pair(config: dict, dtype: torch.dtype):
    """(stock, fused) modules of one config and one set of weights."""
    torch.manual_seed(0)
    stock = MODELS.build(copy.deepcopy(config))
    stock.init_weights()  # mmdetection's initialisation (the classifier's prior bias)
    stock.to(dtype)
    fused_mmdet.use_fused_losses()
    fused = MODELS.build(copy.deepcopy(config)).to(dtype)
    fused_mmdet.restore_stock_losses()
    fused.load_state_dict(stock.state_dict(), strict=True)
    return stock, fused


def ground_truth(num_images: int, size: int, num_classes: int, dtype: torch.dtype, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    instances, metas = [], []
    for _ in range(num_images):
        centre = torch.rand(6, 2, generator=generator) * size * 0.6 + size * 0.2
        half = torch.rand(6, 2, generator=generator) * size * 0.2 + 8
        boxes = torch.cat([centre - half, centre + half], 1).clamp(0, size - 1).to(dtype)
        labels = torch.randint(0, num_classes, (6,), generator=generator)
        instances.append(InstanceData(bboxes=boxes, labels=labels))
        metas.append(
            dict(
                img_shape=(size, size), pad_shape=(size, size), batch_input_shape=(size, size), scale_factor=(1.0, 1.0)
            )
        )
    return instances, metas


def fpn_features(num_images: int, size: int, channels: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(2)
    return [
        torch.randn(num_images, channels, size // s, size // s, generator=generator, dtype=dtype)
        for s in (8, 16, 32, 64, 128)
    ]


def total(losses: dict) -> torch.Tensor:
    return sum(
        value.sum() if isinstance(value, torch.Tensor) else sum(v.sum() for v in value) for value in losses.values()
    )


def losses_and_gradients(module, compute):
    module.zero_grad()
    losses = compute(module)
    total(losses).backward()
    values = {
        name: torch.stack([v.detach() for v in value]) if isinstance(value, list) else value.detach()
        for name, value in losses.items()
    }
    gradients = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return values, gradients


def assert_same(stock_result, fused_result, dtype):
    (stock_losses, stock_grads), (fused_losses, fused_grads) = stock_result, fused_result
    rtol = FP32_RTOL[dtype]
    assert stock_losses.keys() == fused_losses.keys()
    for name in stock_losses:
        assert fused_losses[name].dtype == stock_losses[name].dtype, name
        torch.testing.assert_close(fused_losses[name], stock_losses[name], rtol=rtol, atol=rtol * 1e-2, msg=name)
    assert stock_grads.keys() == fused_grads.keys() and stock_grads
    for name, grad in stock_grads.items():
        scale = grad.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(fused_grads[name] / scale, grad / scale, rtol=rtol, atol=rtol, msg=name)


def head_loss(features, instances, metas):
    def compute(head):
        return head.loss_by_feat(*head(features), instances, metas)

    return compute


def test_gfl_head_losses_and_gradients_match_stock():
    dtype = torch.float32
    stock, fused = build_pair(head_config("gfl/gfl_r50_fpn_1x_coco.py"), dtype)
    assert type(fused.loss_cls) is fused_mmdet.FusedQualityFocalLoss
    assert type(fused.loss_dfl) is fused_mmdet.FusedDistributionFocalLoss
    assert type(fused.integral) is fused_mmdet.FusedIntegral
    instances, metas = ground_truth(2, 256, 80, dtype)
    compute = head_loss(fpn_features(2, 256, 32, dtype), instances, metas)
    assert_same(losses_and_gradients(stock, compute), losses_and_gradients(fused, compute), dtype)


@pytest.mark.parametrize("epoch", [0, 12], ids=["initial_focal_atss", "qfl_task_aligned"])
def test_tood_head_losses_and_gradients_match_stock(epoch):
    """TOOD takes probabilities (activated=True): FocalLoss in its first epochs, QFL after."""
    dtype = torch.float32
    MessageHub.get_current_instance().update_info("epoch", epoch)
    stock, fused = build_pair(head_config("tood/tood_r50_fpn_1x_coco.py"), dtype)
    assert type(fused.loss_cls) is fused_mmdet.FusedQualityFocalLoss
    assert type(fused.initial_loss_cls) is fused_mmdet.FusedFocalLoss
    instances, metas = ground_truth(2, 256, 80, dtype)
    compute = head_loss(fpn_features(2, 256, 32, dtype), instances, metas)
    assert_same(losses_and_gradients(stock, compute), losses_and_gradients(fused, compute), dtype)


def test_vfnet_head_losses_and_gradients_match_stock():
    """VFNet: the dense IoU-aware varifocal target, and a DeformConv2d (the stand-in's,
    through torchvision) that refines the boxes."""
    dtype = torch.float32
    stock, fused = build_pair(head_config("vfnet/vfnet_r50_fpn_1x_coco.py"), dtype)
    assert type(fused.loss_cls) is fused_mmdet.FusedVarifocalLoss
    instances, metas = ground_truth(2, 256, 80, dtype)
    compute = head_loss(fpn_features(2, 256, 32, dtype), instances, metas)
    assert_same(losses_and_gradients(stock, compute), losses_and_gradients(fused, compute), dtype)


def detector_batch(size: int):
    instances, metas = ground_truth(2, size, 80, torch.float32)
    samples = []
    for instance, meta in zip(instances, metas):
        sample = DetDataSample(metainfo=meta)
        sample.gt_instances = instance
        samples.append(sample)
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    return inputs, samples


def small_gfl_detector() -> dict:
    config = model_config("gfl/gfl_r50_fpn_1x_coco.py")
    config.backbone.update(depth=18, init_cfg=None)
    config.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    config.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=2)
    return config


def test_gfl_detector_from_config_trains_as_stock():
    """The whole detector of configs/gfl (ResNet-18 backbone for time): losses and every
    gradient at the first step, then three SGD steps that stay together."""
    stock, fused = build_pair(small_gfl_detector(), torch.float32)
    stock.train(), fused.train()
    inputs, samples = detector_batch(192)

    def compute(model):
        return model.loss(inputs, samples)

    assert_same(losses_and_gradients(stock, compute), losses_and_gradients(fused, compute), torch.float32)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (stock, fused)]
    for _ in range(3):
        step_losses = []
        for model, optimizer in zip((stock, fused), optimizers):
            optimizer.zero_grad()
            loss = total(compute(model))
            loss.backward()
            optimizer.step()
            step_losses.append(loss.detach())
        torch.testing.assert_close(step_losses[1], step_losses[0], rtol=1e-5, atol=0)
    for (name, a), (_, b) in zip(stock.named_parameters(), fused.named_parameters()):
        scale = a.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_names_registered_and_subclass_stock():
    for stock_name, stock_class in STOCK_CLASSES.items():
        fused_class = MODELS.get(f"Fused{stock_name}")
        assert fused_class is getattr(fused_mmdet, f"Fused{stock_name}")
        assert issubclass(fused_class, stock_class)
        assert MODELS.get(stock_name) is stock_class
    assert issubclass(MODELS.get("FusedIntegral"), mmdet.models.dense_heads.gfl_head.Integral)


def test_stock_names_opt_in_and_undo():
    from mmdet.models.dense_heads import gfl_head

    stock_integral = gfl_head.Integral
    assert not fused_mmdet.using_fused_losses()
    fused_mmdet.use_fused_losses()
    assert fused_mmdet.using_fused_losses()
    for stock_name in STOCK_CLASSES:
        assert MODELS.get(stock_name) is getattr(fused_mmdet, f"Fused{stock_name}")
    assert gfl_head.Integral is fused_mmdet.FusedIntegral
    loss = MODELS.build(dict(type="QualityFocalLoss", beta=1.5, loss_weight=0.5))
    assert isinstance(loss, QualityFocalLoss) and loss.beta == 1.5 and loss.loss_weight == 0.5
    fused_mmdet.restore_stock_losses()
    assert not fused_mmdet.using_fused_losses()
    for stock_name, stock_class in STOCK_CLASSES.items():
        assert MODELS.get(stock_name) is stock_class
    assert gfl_head.Integral is stock_integral


def test_config_custom_imports_opt_in():
    """What a config's custom_imports does: importing stock_names opts in."""
    import importlib
    import sys

    sys.modules.pop("gfl_ops.integrations.mmdet.stock_names", None)
    from mmengine.utils import import_modules_from_strings

    import_modules_from_strings(["gfl_ops.integrations.mmdet.stock_names"])
    assert fused_mmdet.using_fused_losses()
    assert importlib.import_module("gfl_ops.integrations.mmdet.stock_names")


def test_config_opt_in_works_again_after_a_restore():
    """A second config in the same process asks for the fused losses by the same import
    after restore_stock_losses(): it must get them, not the cached module's nothing."""
    from mmengine.utils import import_modules_from_strings

    for _ in range(2):
        import_modules_from_strings(["gfl_ops.integrations.mmdet.stock_names"])
        assert fused_mmdet.using_fused_losses()
        assert isinstance(MODELS.build(dict(type="FocalLoss")), fused_mmdet.FusedFocalLoss)
        fused_mmdet.restore_stock_losses()
        assert not fused_mmdet.using_fused_losses()
        assert type(MODELS.build(dict(type="FocalLoss"))) is FocalLoss


def test_restore_after_a_reload_of_the_adapter_restores_everything():
    """use_fused_losses(), importlib.reload of the adapter, restore_stock_losses(): GFLHead's
    Integral was left the old module's FusedIntegral while using_fused_losses() said False."""
    import importlib

    from mmdet.models.dense_heads import gfl_head

    stock_integral = gfl_head.Integral
    fused_mmdet.use_fused_losses()
    importlib.reload(fused_mmdet)
    assert fused_mmdet.using_fused_losses()
    fused_mmdet.restore_stock_losses()
    assert gfl_head.Integral is stock_integral
    assert not fused_mmdet.using_fused_losses()
    for stock_name, stock_class in STOCK_CLASSES.items():
        assert MODELS.get(stock_name) is stock_class


def test_stock_gfl_checkpoint_loads_into_fused_head_and_swap_integral():
    config = head_config("gfl/gfl_r50_fpn_1x_coco.py")
    stock, fused = build_pair(config, torch.float32)  # strict load inside
    assert "integral.project" in fused.state_dict()
    torch.manual_seed(0)
    built_before = MODELS.build(copy.deepcopy(config))
    assert fused_mmdet.swap_integral(built_before) == 1
    assert type(built_before.integral) is fused_mmdet.FusedIntegral
    assert fused_mmdet.swap_integral(built_before) == 0
    built_before.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(7, 4 * 17)
    torch.testing.assert_close(built_before.integral(x), stock.integral(x))


def test_dtype_promotion_as_mmdetection():
    pred = torch.randn(6, 17)
    target = torch.rand(6, dtype=torch.float64) * 15
    weight = torch.rand(6, dtype=torch.float64)
    for name, args in (
        ("DistributionFocalLoss", (pred, target)),
        ("DistributionFocalLoss", (pred, target.float(), weight)),
        ("QualityFocalLoss", (pred[:, :5], (torch.arange(6) % 6, torch.rand(6)), weight)),
    ):
        stock = STOCK_CLASSES[name]()(*args)
        fused = getattr(fused_mmdet, f"Fused{name}")()(*args)
        assert fused.dtype == stock.dtype == torch.float64
        torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(STOCK_CLASSES))
def test_bad_reduction_override_raises_assertion_and_value_error(name):
    """mmdetection asserts; gfl_ops raises ValueError: the fused classes raise one error that is both."""
    pred = torch.rand(10, 4)
    target = torch.rand(10, 4) if name != "DistributionFocalLoss" else torch.rand(10) * 3
    for cls in (STOCK_CLASSES[name], getattr(fused_mmdet, f"Fused{name}")):
        with pytest.raises(AssertionError):
            cls()(pred, target, None, reduction_override=True)
    with pytest.raises(ValueError, match="reduction_override"):
        getattr(fused_mmdet, f"Fused{name}")()(pred, target, None, reduction_override="max")


# What mmdetection's own loss unit tests (tests/test_models/test_losses/test_loss.py of
# mmdetection 3.3.0, not shipped in its packages) check of these classes, asserted on the
# stock class and on the fused one alike.
def stock_and_fused(name: str):
    return pytest.mark.parametrize(
        "loss_class", [STOCK_CLASSES[name], getattr(fused_mmdet, f"Fused{name}")], ids=["stock", "fused"]
    )


@stock_and_fused("QualityFocalLoss")
@pytest.mark.parametrize("activated", [False, True])
def test_contract_quality_focal_loss_label_and_dense_forms_agree(loss_class, activated):
    pred = torch.rand(4, 5)
    label = torch.tensor([0, 1, 2, 0])
    score = torch.rand(4)
    from_labels = loss_class(activated=activated)(pred, (label, score))
    dense = torch.nn.functional.one_hot(label, 5) * score.reshape(4, 1)
    from_dense = loss_class(activated=activated)(pred, dense)
    assert isinstance(from_labels, torch.Tensor) and from_labels.dim() == 0
    torch.testing.assert_close(from_dense, from_labels, rtol=1e-6, atol=1e-7)


@stock_and_fused("FocalLoss")
@pytest.mark.parametrize("shape", [(10, 5), (3, 5, 40, 40)])
def test_contract_focal_loss_reductions_and_avg_factor(loss_class, shape):
    pred = torch.rand(shape)
    if len(shape) == 2:
        target = torch.randint(0, 5, (shape[0],))
    else:
        batch, classes, height, width = shape
        target = torch.nn.functional.one_hot(torch.randint(0, 5, (batch * height * width,)), classes)
        target = target.reshape(batch, height, width, classes).permute(0, 3, 1, 2)
    for kwargs in (dict(), dict(reduction_override="mean"), dict(avg_factor=10)):
        assert isinstance(loss_class()(pred, target, **kwargs), torch.Tensor)
    with pytest.raises(ValueError):
        loss_class()(pred, target, avg_factor=10, reduction_override="sum")
    for override in (None, "none", "mean"):
        assert isinstance(loss_class()(pred, target, avg_factor=10, reduction_override=override), torch.Tensor)


@stock_and_fused("DistributionFocalLoss")
def test_contract_distribution_focal_loss_reductions_and_avg_factor(loss_class):
    pred = torch.rand(10, 17)
    target = torch.rand(10) * 15.9
    weight = torch.rand(10)
    reference = STOCK_CLASSES["DistributionFocalLoss"]()
    for kwargs in (
        dict(),
        dict(weight=weight),
        dict(reduction_override="sum"),
        dict(avg_factor=4.0, weight=weight),
        dict(reduction_override="none"),
    ):
        args = (pred, target, kwargs.pop("weight", None))
        torch.testing.assert_close(loss_class()(*args, **kwargs), reference(*args, **kwargs), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        loss_class()(pred, target, avg_factor=10, reduction_override="sum")


def stock_and_fused_values_and_gradients(name: str, pred: torch.Tensor, *args, **kwargs):
    """The stock class's and the fused class's loss and gradient with respect to pred."""
    results = []
    for loss_class in (STOCK_CLASSES[name], getattr(fused_mmdet, f"Fused{name}")):
        leaf = pred.detach().clone().requires_grad_()
        loss = loss_class()(leaf, *args, **kwargs)
        loss.sum().backward()
        results.append((loss.detach(), leaf.grad))
    return results


@pytest.mark.parametrize(
    "options",
    [dict(avg_factor=3.0), dict(reduction_override="none"), dict(reduction_override="sum")],
    ids=["mean", "none", "sum"],
)
def test_grounding_dino_vector_focal_loss_matches_stock(options):
    """GroundingDINOHead.loss_by_feat_single masks its (B, Q, C) scores, one-hot labels and
    weights down to vectors and calls FocalLoss on them (one-hot form: pred.dim() ==
    target.dim())."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 6, 5, generator=generator)
    text_mask = torch.rand(2, 6, 5, generator=generator) < 0.7
    labels = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 6), generator=generator), 5)
    label_weights = torch.rand(2, 6, generator=generator)[..., None].repeat(1, 1, 5)
    pred = torch.masked_select(scores, text_mask)
    arguments = (torch.masked_select(labels, text_mask), torch.masked_select(label_weights, text_mask))
    (stock, stock_grad), (fused, fused_grad) = stock_and_fused_values_and_gradients(
        "FocalLoss", pred, *arguments, **options
    )
    assert fused.shape == stock.shape
    torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_grad, stock_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["FocalLoss", "VarifocalLoss"])
def test_anchor_weight_of_shape_n_by_1_matches_stock(name):
    """Both stock classes view an (N, 1) weight as one per anchor."""
    generator = torch.Generator().manual_seed(4)
    pred = torch.randn(7, 4, generator=generator)
    if name == "FocalLoss":
        target = torch.randint(0, 5, (7,), generator=generator)
    else:
        target = torch.rand(7, 4, generator=generator) * (torch.rand(7, 4, generator=generator) < 0.3)
    weight = torch.rand(7, 1, generator=generator)
    (stock, stock_grad), (fused, fused_grad) = stock_and_fused_values_and_gradients(name, pred, target, weight)
    torch.testing.assert_close(fused, stock, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_grad, stock_grad, rtol=1e-6, atol=1e-7)


def test_detr_head_routes_the_fused_qfl_as_its_quality_focal_loss():
    """DETRHead (as DINO and Grounding DINO) gives (labels, IoU scores) only to a loss that is
    an mmdetection QualityFocalLoss: the fused one gets them, and matches stock."""
    config = dict(
        type="DETRHead", num_classes=5, embed_dims=16,
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        train_cfg=dict(assigner=dict(type="HungarianAssigner", match_costs=[
            dict(type="FocalLossCost", weight=2.0),
            dict(type="BBoxL1Cost", weight=5.0, box_format="xywh"),
            dict(type="IoUCost", iou_mode="giou", weight=2.0)])),
    )  # fmt: skip
    stock, fused = build_pair(config, torch.float32)
    assert isinstance(fused.loss_cls, QualityFocalLoss)
    instances, metas = ground_truth(2, 256, 5, torch.float32)
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 30, 5, generator=generator)
    boxes = torch.rand(2, 30, 4, generator=generator) * 0.5 + 0.25

    def compute(head):
        leaves = [scores.clone().requires_grad_(), boxes.clone().requires_grad_()]
        losses = head.loss_by_feat_single(*leaves, instances, metas)
        sum(losses).backward()
        return [loss.detach() for loss in losses], [leaf.grad for leaf in leaves]

    (stock_losses, stock_grads), (fused_losses, fused_grads) = compute(stock), compute(fused)
    for fused_value, stock_value in zip(fused_losses + fused_grads, stock_losses + stock_grads):
        torch.testing.assert_close(fused_value, stock_value, rtol=2e-5, atol=1e-7)
    assert stock_grads[0].abs().sum() > 0
