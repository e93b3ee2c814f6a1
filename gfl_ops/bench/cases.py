"""What one measurement is: an op at one shape, layout and dtype (Case), the inputs every
provider of it reads (Inputs), and what an op brings to the harness (OpSpec: its
functions, inputs, byte model and eager peers; one module per op family under ops/, which
also holds the registry)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("forward", "full")  # the loss as a training step computes it; forward + backward
LAYOUTS = ("nc", "nchw")  # the QFL pred layouts; DFL and the integral take "rows"
CHANNEL_FIRST_BATCH = 2  # (B, C, H, W) with H * W = N / B: 2 images per GPU, as GFL trains
POSITIVE_FRACTION = 0.01
BETA = 2.0


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def channel_first_plane(anchors_per_image: int) -> Tuple[int, int]:
    """(H, W) with H * W = anchors_per_image, as close to square as the divisors allow."""
    height = int(math.isqrt(anchors_per_image))
    while anchors_per_image % height:
        height -= 1
    return height, anchors_per_image // height


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: pred's shape is rows x classes (bins), laid out as `layout`."""

    op: str
    rows: int  # anchors N (QFL) or rows M (DFL, integral)
    classes: int  # C (QFL) or bins n + 1
    layout: str  # "nc": (N, C); "nchw": (B, C, H, W), H * W = N / B; "rows": (M, n + 1)
    dtype: torch.dtype

    @property
    def pred_shape(self) -> Tuple[int, ...]:
        if self.layout == "nchw":
            height, width = channel_first_plane(self.rows // CHANNEL_FIRST_BATCH)
            return (CHANNEL_FIRST_BATCH, self.classes, height, width)
        return (self.rows, self.classes)

    @property
    def anchor_shape(self) -> Tuple[int, ...]:
        shape = self.pred_shape
        return (shape[0],) + shape[2:]

    @property
    def label(self) -> str:
        return "x".join(str(size) for size in self.pred_shape)

    @property
    def pred_bytes(self) -> int:
        return math.prod(self.pred_shape) * self.dtype.itemsize


@dataclasses.dataclass
class Inputs:
    """The tensors every provider of a case reads: one set, shared by all of them."""

    pred: torch.Tensor  # a leaf that requires grad
    args: tuple  # positional arguments after pred
    kwargs: dict  # keyword arguments, identical for every provider
    grad_out: Optional[torch.Tensor] = None  # d total / d output for non-scalar outputs


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op as the harness sees it. `inputs(case, generator, device)` builds its Inputs
    (random numbers drawn from `generator`, on the CPU, then moved); `target_bytes(case)`
    is what the forward reads besides pred (or writes: the integral's E) and
    `backward_bytes(case)` what the backward reads besides pred and the gradient;
    `peers[name](case, device)` is the eager function a framework's users run today
    (imported from the framework by peers.py), with the provider signature."""

    name: str
    operator: str  # torch.ops.gfl_ops.<operator>: what available_backends is asked about
    public: Callable  # gfl_ops.<fn>, called with backend=...
    reference: Callable  # gfl_ops.reference.<fn>: the compile provider compiles it
    inputs: Callable[[Case, torch.Generator, torch.device], Inputs]
    target_bytes: Callable[[Case], int]
    peers: Dict[str, Callable[[Case, torch.device], Callable]]
    layouts: Tuple[str, ...] = LAYOUTS
    backward_bytes: Callable[[Case], int] = lambda case: 0
