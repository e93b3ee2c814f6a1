"""gfl_ops: fused kernels for the Generalized Focal Loss family (Quality, Distribution,
sigmoid focal and varifocal loss).

    import gfl_ops
    loss = gfl_ops.quality_focal_loss(cls_score, labels, iou_scores, avg_factor=num_pos)
    loss = gfl_ops.distribution_focal_loss(bbox_dist, targets, weight=w, avg_factor=4.0)
    loss = gfl_ops.sigmoid_focal_loss(cls_score, labels, avg_factor=num_pos)
    loss = gfl_ops.varifocal_loss(cls_score, (labels, iou_scores), detach_weight=True)

Modules for mmdetection configs and training loops: gfl_ops.nn. The plain-PyTorch oracle:
gfl_ops.reference. Backends: gfl_ops.available_backends(device).
"""

from . import _ops, nn, reference
from ._backends import available_backends, resolve_backend
from ._reduction import weight_reduce_loss
from .functional import (
    distribution_focal_loss,
    distribution_integral,
    quality_focal_loss,
    quality_focal_loss_dense,
    sigmoid_focal_loss,
    varifocal_loss,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "distribution_focal_loss",
    "distribution_integral",
    "nn",
    "quality_focal_loss",
    "quality_focal_loss_dense",
    "reference",
    "resolve_backend",
    "sigmoid_focal_loss",
    "varifocal_loss",
    "weight_reduce_loss",
]
