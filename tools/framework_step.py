"""The frameworks' whole loss step, stock vs fused: python -m tools.framework_step [--json PATH].

- mmdetection: GFLHead.loss_by_feat (ATSS assignment, QFL, GIoU, DFL, the integral) forward
  and backward, for 2 images of 800x1333 with C = 80 (five FPN levels, 256 channels);
- ultralytics: v8DetectionLoss (task-aligned assignment, BCE, CIoU, DFL) forward and
  backward for YOLOv8's head output at batch 16, 640x640, C = 80.

Each step runs stock and fused interleaved (one of each per round) and reports medians,
and the share of the stock step that its target assignment takes (timed alone), which the
fused kernels do not touch. Needs the frameworks (make frameworks).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
import types
from typing import Callable, Dict, List, Optional

import torch

from gfl_ops._command_line import device_argument, writable_file_argument
from gfl_ops.bench.results import environment


def _timed(step: Callable[[], None], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def _interleaved_medians(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int, device) -> Dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def _gfl_head_steps(device, images: int = 2, height: int = 800, width: int = 1333) -> Dict[str, Callable[[], None]]:
    from tools import mmcv_ops_standin

    mmcv_ops_standin.install()  # only where mmcv was built without its ops
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.structures import InstanceData
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import mmdet

    from gfl_ops.integrations import mmdet as fused_mmdet

    register_all_modules()
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every parameter
    config = Config.fromfile(
        os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "gfl", "gfl_r50_fpn_1x_coco.py")
    ).model
    head_config = dict(copy.deepcopy(config.bbox_head), train_cfg=config.train_cfg)
    torch.manual_seed(0)
    stock = MODELS.build(copy.deepcopy(head_config))
    stock.init_weights()
    fused_mmdet.use_fused_losses()
    try:
        fused = MODELS.build(copy.deepcopy(head_config))
    finally:
        fused_mmdet.restore_stock_losses()
    fused.load_state_dict(stock.state_dict())
    stock.to(device), fused.to(device)
    generator = torch.Generator().manual_seed(1)
    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    features = [
        torch.randn(images, 256, -(-pad_h // s), -(-pad_w // s), generator=generator).to(device)
        for s in (8, 16, 32, 64, 128)
    ]
    instances, metas = [], []
    for _ in range(images):  # 8 objects per image, COCO's median count
        centre = torch.rand(8, 2, generator=generator) * torch.tensor([width, height]) * 0.8 + 50
        half = torch.rand(8, 2, generator=generator) * 150 + 16
        boxes = torch.cat([centre - half, centre + half], 1)
        instances.append(
            InstanceData(bboxes=boxes.to(device), labels=torch.randint(0, 80, (8,), generator=generator).to(device))
        )
        metas.append(
            dict(
                img_shape=(height, width),
                pad_shape=(pad_h, pad_w),
                batch_input_shape=(pad_h, pad_w),
                scale_factor=(1.0, 1.0),
            )
        )
    outputs = {name: head(features) for name, head in (("stock", stock), ("fused", fused))}
    leaves = {name: [t.detach().requires_grad_() for t in sum(map(list, out), [])] for name, out in outputs.items()}

    def step(head, tensors):
        def run():
            scores, boxes = tensors[:5], tensors[5:]
            losses = head.loss_by_feat(scores, boxes, instances, metas)
            sum(sum(value) for value in losses.values()).backward()

        return run

    def assign():
        with torch.no_grad():
            scores = leaves["stock"][:5]
            anchors, valid = stock.get_anchors([s.shape[-2:] for s in scores], metas, device=device)
            stock.get_targets(anchors, valid, instances, metas)

    return {"stock": step(stock, leaves["stock"]), "fused": step(fused, leaves["fused"]), "assignment": assign}


def _yolov8_loss_steps(device, batch: int = 16, size: int = 640) -> Dict[str, Callable[[], None]]:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import loss as ultralytics_loss

    from gfl_ops.integrations import ultralytics as fused_ultralytics

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).to(device)
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outputs = model(torch.rand(batch, 3, size, size, generator=generator).to(device))
    count = batch * 8
    labels = dict(
        batch_idx=torch.arange(batch).repeat_interleave(8).float().to(device),
        cls=torch.randint(0, 80, (count, 1), generator=generator).float().to(device),
        bboxes=torch.cat(
            [
                torch.rand(count, 2, generator=generator) * 0.6 + 0.2,
                torch.rand(count, 2, generator=generator) * 0.3 + 0.05,
            ],
            1,
        ).to(device),
    )
    criterion = ultralytics_loss.v8DetectionLoss(model)
    head = {key: value for key, value in outputs.items()}

    def leaves():
        return dict(
            head, boxes=head["boxes"].detach().requires_grad_(), scores=head["scores"].detach().requires_grad_()
        )

    def stock():
        loss, _ = criterion(leaves(), labels)
        loss.sum().backward()

    def fused():
        with fused_ultralytics.patched():
            loss, _ = criterion(leaves(), labels)
        loss.sum().backward()

    def assign():
        with torch.no_grad():
            preds = leaves()
            scores = preds["scores"].permute(0, 2, 1).contiguous()
            distri = preds["boxes"].permute(0, 2, 1).contiguous()
            anchors, strides = ultralytics_loss.make_anchors(preds["feats"], criterion.stride, 0.5)
            imgsz = torch.tensor(preds["feats"][0].shape[2:], device=device) * criterion.stride[0]
            targets = torch.cat((labels["batch_idx"].view(-1, 1), labels["cls"].view(-1, 1), labels["bboxes"]), 1)
            targets = criterion.preprocess(targets, batch, scale_tensor=imgsz[[1, 0, 1, 0]].float())
            gt_labels, gt_bboxes = targets.split((1, 4), 2)
            boxes = criterion.bbox_decode(anchors, distri)
            criterion.assigner(
                scores.sigmoid(),
                (boxes * strides).type(gt_bboxes.dtype),
                anchors * strides,
                gt_labels,
                gt_bboxes,
                gt_bboxes.sum(2, keepdim=True).gt_(0.0),
            )

    return {"stock": stock, "fused": fused, "assignment": assign}


FRAMEWORK_STEPS = {
    "mmdet GFLHead.loss_by_feat (2 x 800x1333, C=80)": _gfl_head_steps,
    "ultralytics v8DetectionLoss (16 x 640x640, C=80)": _yolov8_loss_steps,
}


def run(device: torch.device, repeats: int, warmup: int) -> List[dict]:
    rows = []
    for name, build in FRAMEWORK_STEPS.items():
        medians = _interleaved_medians(build(device), repeats, warmup, device)
        rows.append(
            dict(
                step=name,
                stock_s=medians["stock"],
                fused_s=medians["fused"],
                assignment_s=medians["assignment"],
                speedup=medians["stock"] / medians["fused"],
                assignment_share_of_stock=medians["assignment"] / medians["stock"],
                assignment_share_of_fused=medians["assignment"] / medians["fused"],
            )
        )
        print(
            f"{name}: stock {medians['stock'] * 1e3:.0f} ms, fused {medians['fused'] * 1e3:.0f} ms "
            f"({rows[-1]['speedup']:.2f}x); the target assignment alone {medians['assignment'] * 1e3:.0f} ms "
            f"({rows[-1]['assignment_share_of_stock']:.0%} of the stock step, "
            f"{rows[-1]['assignment_share_of_fused']:.0%} of the fused one)",
            flush=True,
        )
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.framework_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=writable_file_argument, metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")

    device = torch.device(args.device)
    env = environment(device)
    print(
        f"gfl_ops framework bench on {env['device']['name']} ({device.type}, {env['device']['threads']} threads), "
        f"torch {env['versions']['torch']}, median of {args.repeats}",
        flush=True,
    )
    rows = run(device, args.repeats, args.warmup)
    if args.json is not None:
        args.json.write_text(json.dumps(dict(environment=env, framework_steps=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
