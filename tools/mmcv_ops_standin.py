"""A stand-in for mmcv.ops, for mmcv built without its compiled ops (MMCV_WITH_OPS=0), used
only by the framework tests (tests/integrations/test_framework_mmdet.py), the benchmark's
tests, the framework benchmark (tools/framework_step.py) and `python -m
tools.mmcv_ops_standin gfl_ops bench ...` (the benchmark with its mmdet peer); the adapters
never install it.

mmdetection imports mmcv.ops at import time (NMS, RoIAlign, deformable convolution, ...)
for its post-processing and other heads; the loss code these tests run never calls any of
them. TOODHead's forward samples its box features with mmcv.ops.deform_conv2d, and
VFNetHead's refines its boxes with an mmcv.ops.DeformConv2d module: this stand-in computes
both with torchvision.ops.deform_conv2d (the same offsets layout: (dy, dx) per kernel
position and offset group); the stock and the fused runs share it. Every other name is a
placeholder that raises when it is called or instantiated.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
import types

import torch


def _placeholder(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"mmcv.ops.{name} is not available: mmcv was built without its compiled ops")

    return type(name, (torch.nn.Module,), {"__init__": unavailable, "__call__": unavailable})


def deform_conv2d(
    input, offset, weight, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, bias=False, im2col_step=32
):
    """mmcv.ops.deform_conv2d through torchvision (groups and offset groups follow from the
    weight's and the offset's shapes there)."""
    import torchvision

    pair = torch.nn.modules.utils._pair
    return torchvision.ops.deform_conv2d(
        input, offset, weight, stride=pair(stride), padding=pair(padding), dilation=pair(dilation)
    )


class DeformConv2d(torch.nn.Module):
    """mmcv.ops.DeformConv2d: its constructor, its weight (and its initialisation, uniform
    in +-1 / sqrt(in_channels x kernel area)) and forward(x, offset), through deform_conv2d.
    mmcv's module has no bias."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=False,
        im2col_step=32,
    ):
        super().__init__()
        if bias:
            raise ValueError("mmcv.ops.DeformConv2d has no bias")
        pair = torch.nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (
            pair(kernel_size),
            pair(stride),
            pair(padding),
            pair(dilation),
        )
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        bound = 1.0 / (in_channels * self.kernel_size[0] * self.kernel_size[1]) ** 0.5
        torch.nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, offset):
        return deform_conv2d(x, offset, self.weight, self.stride, self.padding, self.dilation)


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.deform_conv2d = deform_conv2d
    module.DeformConv2d = DeformConv2d
    module.__getattr__ = lambda attribute: (
        (_ for _ in ()).throw(AttributeError(attribute)) if attribute.startswith("__") else _placeholder(attribute)
    )
    return module


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves mmcv.ops and every mmcv.ops.<submodule> as a stand-in module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _module(spec.name)

    def exec_module(self, module):
        pass


def main(argv) -> None:
    """python -m tools.mmcv_ops_standin MODULE [ARGS...]: `python -m MODULE ARGS` with the
    stand-in installed, e.g. the benchmark with its mmdet peer on mmcv-lite."""
    install()
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def install() -> bool:
    """Serve the stand-in when mmcv is importable but its ops are not built; returns
    whether it does."""
    if importlib.util.find_spec("mmcv") is None or importlib.util.find_spec("mmcv._ext") is not None:
        return False
    if not any(isinstance(finder, _StandinFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StandinFinder())
    return True


if __name__ == "__main__":
    main(sys.argv[1:])
