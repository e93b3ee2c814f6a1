"""ultralytics' detection loss on gfl_ops' fused classification BCE, DFL and integral.

    import gfl_ops.integrations.ultralytics as gfl_ultralytics
    gfl_ultralytics.patch()      # every v8DetectionLoss from now on (and already built)
    YOLO("yolov8n.yaml").train(data=..., epochs=...)
    gfl_ultralytics.unpatch()    # the stock method again, the same function object

patch() replaces one method, v8DetectionLoss.get_assigned_targets_and_loss, which the
detection, segmentation and pose losses and the end-to-end losses (E2ELoss: YOLOv10, YOLO26) call.
The replacement computes what ultralytics computes:

- classification: BCE with logits of the (B, nc, A) scores the head returns, read in place
  (ultralytics copies them to (B, A, nc) first) against the assigner's (B, A, nc) scores,
  summed (times the model's class_weights, if any) and divided by target_scores.sum()
  clamped to >= 1: quality_focal_loss_dense with beta = 0, which is BCE;
- boxes: ultralytics' bbox_decode with the fused distribution integral (reg_max = 16 bins
  in ultralytics' sense), and DFL of the foreground's 4 sides with targets clamped into
  [0, reg_max - 1.01], the mean over the sides times the box's target-score sum, divided by
  target_scores_sum; CIoU and the assigner are ultralytics' own. Nothing reads a CUDA
  tensor on the host beyond what ultralytics itself does.

The method reproduces ultralytics' code of the versions in TESTED_SOURCES; patch() refuses
any other (it compares the source of every function it mirrors), so an ultralytics update
cannot silently diverge. Checkpoints hold no gfl_ops object: a model trained while patched
loads with YOLO("best.pt") in a process that never imported gfl_ops.

Licence: this module reproduces code of ultralytics 8.4.190 (the functions in
TESTED_SOURCES), which Ultralytics publishes under the GNU AGPL-3.0; this module is
therefore distributed under the AGPL-3.0 (LICENSE-AGPL-3.0), the rest of gfl_ops under the
Apache-2.0 (LICENSE).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
from typing import Iterator

import torch
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.utils import loss as _loss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import bbox2dist, dist2bbox, make_anchors

from .. import functional

__all__ = ["patch", "unpatch", "patched", "is_patched", "TESTED_SOURCES"]

# The ultralytics functions the fused method reproduces, and the SHA-256 of their source in
# each tested release. A release whose functions differ is refused.
TESTED_SOURCES = {
    "8.4.190": {
        "v8DetectionLoss.get_assigned_targets_and_loss": (
            "b35c135782626c01cabcc6d3d053b3ba9903cb0656de9d8e859250159a2119cb"
        ),
        "v8DetectionLoss.bbox_decode": "1bac4e17439eab6cb20ac41fd29c01574dee855fc05d7c5b10161edbfd1c1655",
        "BboxLoss.forward": "d4f7fb78076529d797f04e8bbea1b559714f9ecee44bfc03792369ed4444caef",
        "DFLoss.__call__": "cd40791fd98a04e9894b038d718f0e4e4eec1e53aaf05793f50a2b21f7c257e7",
    },
}

_PATCHED_CLASS = _loss.v8DetectionLoss
_PATCHED_METHOD = "get_assigned_targets_and_loss"


class _PatchState:
    """What patch() replaced, and the with patched() blocks open in any thread; guarded by
    `lock`. The method in place before patch() comes back when unpatched, and a block's exit
    unpatches only when it is the last open one and the method was not patched before the
    first of them opened."""

    lock = threading.Lock()
    method_before_patch = None
    open_blocks = 0
    patched_before_the_blocks = False


# ultralytics keeps the upper bin's interpolation weight above 0.01 (DFLoss).
_UPPER_BIN_MARGIN = 0.01


def _source_digest(qualified_name: str) -> str:
    """The SHA-256 of the function's source; refuses a wrapped function, whose own source
    inspect.getsource would not read (it follows functools.wraps' __wrapped__), so that a
    wrapper's behaviour can neither pass the check nor be silently skipped by the fused loss."""
    owner, attribute = qualified_name.split(".")
    function = inspect.getattr_static(getattr(_loss, owner), attribute)
    if hasattr(function, "__wrapped__"):
        raise RuntimeError(
            f"gfl_ops.integrations.ultralytics: ultralytics' {qualified_name} is wrapped (by "
            f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}); the fused loss "
            "reproduces the unwrapped code and would skip the wrapper: remove the wrapper before patch()"
        )
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def _check_tested_release() -> None:
    tested = TESTED_SOURCES.get(ULTRALYTICS_VERSION)
    if tested is None:
        raise RuntimeError(
            f"gfl_ops.integrations.ultralytics: ultralytics {ULTRALYTICS_VERSION} is not a tested release "
            f"(tested: {', '.join(TESTED_SOURCES)}); the fused loss reproduces those releases' code"
        )
    changed = [name for name, digest in tested.items() if _source_digest(name) != digest]
    if changed:
        raise RuntimeError(
            f"gfl_ops.integrations.ultralytics: ultralytics {ULTRALYTICS_VERSION}'s {', '.join(changed)} differ "
            "from the code the fused loss reproduces; reinstall the release as published"
        )


def _decode_boxes(loss: "_loss.v8DetectionLoss", anchor_points: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
    """v8DetectionLoss.bbox_decode: the expected distance of each side's reg_max bins."""
    if loss.use_dfl:
        batch, anchors, channels = pred_dist.shape
        pred_dist = functional.distribution_integral(pred_dist.view(batch, anchors, 4, channels // 4))
    return dist2bbox(pred_dist, anchor_points, xywh=False)


def _box_losses(
    loss: "_loss.v8DetectionLoss",
    pred_dist,
    pred_bboxes,
    anchor_points,
    target_bboxes,
    target_scores,
    target_scores_sum,
    fg_mask,
    imgsz,
    stride_tensor,
):
    """BboxLoss.forward with DFL fused: (CIoU loss, DFL)."""
    dfl_module = loss.bbox_loss.dfl_loss
    if dfl_module is None:  # reg_max = 1: ultralytics' L1 distances, nothing to fuse
        return loss.bbox_loss(
            pred_dist,
            pred_bboxes,
            anchor_points,
            target_bboxes,
            target_scores,
            target_scores_sum,
            fg_mask,
            imgsz,
            stride_tensor,
        )
    foreground = fg_mask.nonzero(as_tuple=True)
    box_weight = target_scores[foreground].sum(-1, keepdim=True)  # (n_fg, 1)
    iou = bbox_iou(pred_bboxes[foreground], target_bboxes[foreground], xywh=False, CIoU=True)
    loss_iou = ((1.0 - iou) * box_weight).sum() / target_scores_sum
    num_bins = dfl_module.reg_max  # ultralytics' reg_max counts bins
    target_ltrb = bbox2dist(anchor_points, target_bboxes, num_bins - 1)[foreground]
    sides = pred_dist[foreground].view(-1, 4, num_bins)
    # sum over boxes of mean_sides(DFL) * box_weight = sum over sides of DFL * box_weight / 4
    dfl_sum = functional.distribution_focal_loss(
        sides,
        target_ltrb.clamp(0, num_bins - 1 - _UPPER_BIN_MARGIN),
        weight=box_weight,
        reduction="sum",
        validate=False,
    )
    return loss_iou, dfl_sum / 4 / target_scores_sum


def _fused_assigned_targets_and_loss(self, preds: dict, batch: dict, **assign_kwargs) -> tuple:
    """v8DetectionLoss.get_assigned_targets_and_loss on the fused kernels (same returns)."""
    loss = torch.zeros(3, device=self.device)  # box, cls, dfl
    scores = preds["scores"]  # (B, nc, A), read in place
    pred_distri = preds["boxes"].permute(0, 2, 1).contiguous()  # (B, A, 4 * reg_max), as ultralytics
    anchor_points, stride_tensor = make_anchors(preds["feats"], self.stride, 0.5)

    dtype = scores.dtype
    batch_size = scores.shape[0]
    imgsz = torch.tensor(preds["feats"][0].shape[2:], device=self.device, dtype=dtype) * self.stride[0]

    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
    targets = self.preprocess(targets.to(self.device), batch_size, scale_tensor=imgsz[[1, 0, 1, 0]])
    gt_labels, gt_bboxes = targets.split((1, 4), 2)  # cls, xyxy
    mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)

    pred_bboxes = _decode_boxes(self, anchor_points, pred_distri)  # xyxy, (B, A, 4)
    _, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
        scores.detach().sigmoid().permute(0, 2, 1),
        (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
        anchor_points * stride_tensor,
        gt_labels,
        gt_bboxes,
        mask_gt,
        **assign_kwargs,
    )
    target_scores_sum = target_scores.sum().clamp_(min=1)  # on the device: no host sync

    # BCE = QFL with beta = 0; the (B, A, nc) target is read through a (B, nc, A) view.
    class_weight = None if self.class_weights is None else self.class_weights.reshape(-1)
    loss[1] = (
        functional.quality_focal_loss_dense(
            scores,
            target_scores.to(dtype).permute(0, 2, 1),
            beta=0.0,
            class_weight=class_weight,
            reduction="sum",
        )
        / target_scores_sum
    )

    loss[0], loss[2] = _box_losses(
        self,
        pred_distri,
        pred_bboxes,
        anchor_points,
        target_bboxes / stride_tensor,
        target_scores,
        target_scores_sum,
        fg_mask,
        imgsz,
        stride_tensor,
    )
    loss[0] *= self.hyp.box
    loss[1] *= self.hyp.cls
    loss[2] *= self.hyp.dfl
    return (
        (fg_mask, target_gt_idx, target_bboxes, anchor_points, stride_tensor),
        loss,
        dict(zip(self.loss_names, loss.detach())),
    )


def is_patched() -> bool:
    return _PATCHED_CLASS.__dict__.get(_PATCHED_METHOD) is _fused_assigned_targets_and_loss


def _patch_locked() -> None:
    if is_patched():
        return
    _check_tested_release()
    _PatchState.method_before_patch = _PATCHED_CLASS.__dict__[_PATCHED_METHOD]
    setattr(_PATCHED_CLASS, _PATCHED_METHOD, _fused_assigned_targets_and_loss)


def _unpatch_locked() -> None:
    if is_patched():
        setattr(_PATCHED_CLASS, _PATCHED_METHOD, _PatchState.method_before_patch)


def patch() -> None:
    """Make every v8DetectionLoss (built before or after) compute with the fused kernels.

    Raises RuntimeError on an ultralytics release whose code differs from the tested ones,
    or whose mirrored functions are wrapped. Calling it twice is harmless."""
    with _PatchState.lock:
        _patch_locked()


def unpatch() -> None:
    """Put back the method that was in place before patch() (the same object: ultralytics'
    own, or whatever a third party had installed). Harmless when not patched."""
    with _PatchState.lock:
        _unpatch_locked()


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """patch() for the duration of a with block. Blocks may overlap, in one thread or
    several: the method is restored when the last open block exits, and not at all if it was
    patched before the first of them opened."""
    with _PatchState.lock:
        if _PatchState.open_blocks == 0:
            _PatchState.patched_before_the_blocks = is_patched()
        _patch_locked()
        _PatchState.open_blocks += 1
    try:
        yield
    finally:
        with _PatchState.lock:
            _PatchState.open_blocks -= 1
            if _PatchState.open_blocks == 0 and not _PatchState.patched_before_the_blocks:
                _unpatch_locked()
