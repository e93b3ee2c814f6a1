"""The providers: each computes the same loss from the same inputs, and the gradient of pred.

    native     gfl_ops.<fn>(..., backend="native"): the fused C++/CUDA kernels
    triton     gfl_ops.<fn>(..., backend="triton"), whenever available_backends() lists it
    reference  gfl_ops.<fn>(..., backend="reference"): the plain-PyTorch oracle, eager
    compile    torch.compile(gfl_ops.reference.<fn>, dynamic=False, fullgraph=True),
               compiled once per shape and warmed up outside the timing
    mmdet, torchvision, ultralytics
               the frameworks' own code, where they import (gfl_ops.bench.peers), for the
               ops they have (a peer an op lacks is not a provider of that op)

A provider that cannot run is never dropped without a word: provider_status says why.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backends
from . import peers
from .cases import Case, Inputs
from .ops import OP_SPECS

PROVIDERS = ("native", "triton", "reference", "compile", "mmdet", "torchvision", "ultralytics")
PEERS = ("mmdet", "torchvision", "ultralytics")
BACKEND_PROVIDERS = ("native", "triton", "reference")  # gfl_ops's own backends
CPU_TRITON = (
    "on CPU Triton is its interpreter (TRITON_INTERPRET=1), a correctness tool whose times mean "
    "nothing (--providers triton to run it anyway)"
)


def provider_status(op: str, device: torch.device) -> Dict[str, Optional[str]]:
    """Every provider of `op` (PROVIDERS less the peers it lacks): None where it can run on
    `device`, else why not."""
    operator = OP_SPECS[op].operator
    status: Dict[str, Optional[str]] = {}
    for name in BACKEND_PROVIDERS:
        try:
            _backends.resolve_backend(name, device, operator)
            status[name] = None
        except ValueError as error:  # names the reason: extension not loaded, no Triton, ...
            status[name] = str(error).replace(f" for {operator}", "")  # the same for every op
    status["compile"] = None if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"
    for peer in OP_SPECS[op].peers:
        status[peer] = peers.unavailable_reason(peer)
    return status


def available_providers(op: str, device: torch.device) -> List[str]:
    """The providers that can run `op` on `device`, in PROVIDERS order."""
    return [name for name, reason in provider_status(op, device).items() if reason is None]


def select_providers(
    op: str, device: torch.device, requested: Optional[Sequence[str]] = None
) -> Tuple[List[str], Dict[str, str]]:
    """The providers to run for `op` (requested None: every available one, triton only where
    it is compiled code), and {provider: why not} for each wanted one that will not run."""
    status = provider_status(op, device)
    if requested is None and torch.device(device).type == "cpu" and status["triton"] is None:
        status["triton"] = CPU_TRITON
    wanted = [name for name in PROVIDERS if name in status and (requested is None or name in requested)]
    names = [name for name in wanted if status[name] is None]
    return names, {name: status[name] for name in wanted if status[name] is not None}


def not_run(ops: Sequence[str], device: torch.device, requested: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """{provider: why not} for each provider that a run of `ops` wants and will not run;
    a reason that holds for some of the ops only is prefixed with them."""
    reasons: Dict[str, Dict[str, List[str]]] = {}
    for op in ops:
        for name, reason in select_providers(op, device, requested)[1].items():
            reasons.setdefault(name, {}).setdefault(reason, []).append(op)
    return {
        name: "; ".join(
            reason if len(found) == len(ops) else f"{', '.join(found)}: {reason}" for reason, found in by_reason.items()
        )
        for name, by_reason in reasons.items()
    }


def make_provider(name: str, case: Case, device: torch.device, compile_backend: str = "inductor") -> Callable:
    """fn(pred, *args, **kwargs) -> the loss (or E for the integral)."""
    spec = OP_SPECS[case.op]
    if name in BACKEND_PROVIDERS:
        return functools.partial(spec.public, backend=name)
    if name == "compile":
        # A fresh compile per shape: no recompilation limit, no dynamic shapes carried over.
        torch._dynamo.reset()
        return torch.compile(spec.reference, dynamic=False, fullgraph=True, backend=compile_backend)
    if name in spec.peers:
        return spec.peers[name](case, device)
    raise ValueError(f"unknown provider {name!r}; providers: {PROVIDERS}")


def run_step(fn: Callable, inputs: Inputs, mode: str) -> torch.Tensor:
    """One training step of the loss: forward, and in "full" mode backward into pred.grad."""
    output = fn(inputs.pred, *inputs.args, **inputs.kwargs)
    if mode == "full":
        output.backward(inputs.grad_out)
    return output


def clear_grad(inputs: Inputs) -> None:
    inputs.pred.grad = None  # set_to_none: the next backward allocates its gradient afresh
