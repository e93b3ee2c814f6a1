"""torch.library.opcheck on every registered operator torch.ops.gfl_ops.*.

Checks the schema (no hidden mutation or aliasing), the autograd registration, the fake
(meta) kernel against the real one (shapes, dtypes, strides) and AOT dispatch with dynamic
shapes: of the public operators with pred requiring grad and not, and of their native
kernels (no autograd of their own: pred does not require grad) with compute_grad True and
False. The samples are the operators' own (gfl_ops/_registry.py).
"""

import pytest
import torch

import gfl_ops  # noqa: F401  (registers the operators)
from _helpers import DEVICES

OPS = torch.ops.gfl_ops
OPERATORS = gfl_ops._registry.OPERATORS


def _public_arguments(name, sample):
    """The public operator's arguments from a kernel's sample, by name (backend defaulted)."""
    return gfl_ops._registry.positional("gfl_ops", name, sample)


def _kernel_arguments(name, sample):
    return gfl_ops._registry.positional("gfl_ops", OPERATORS[name].kernel_name("native"), sample)


def _check(op, args):
    result = torch.library.opcheck(op, args)
    failed = {test: outcome for test, outcome in result.items() if outcome != "SUCCESS"}
    assert not failed, f"{op}: {failed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("grad", [True, False], ids=["requires_grad", "no_grad"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_opcheck_public_operator(device, name, grad, dtype):
    for sample in OPERATORS[name].samples(device, dtype, grad):
        _check(getattr(OPS, name).default, _public_arguments(name, sample))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("compute_grad", [True, False], ids=["compute_grad", "no_grad"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_opcheck_native_kernel(device, name, compute_grad, dtype):
    for sample in OPERATORS[name].samples(device, dtype, compute_grad):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _kernel_arguments(name, sample))
        _check(getattr(OPS, OPERATORS[name].kernel_name("native")).default, args)


def test_samples_exercise_every_argument():
    """Each operator's samples give every kernel argument, and each optional tensor both
    absent and present: opcheck then sees each path of the fake and of the kernel."""
    for name, operator in OPERATORS.items():
        samples = operator.samples("cpu", torch.float32, True)
        names = gfl_ops._registry.argument_names("gfl_ops", operator.kernel_name("native"))
        for sample in samples:
            assert set(sample) == set(names), (name, set(sample) ^ set(names))
        for argument in names:
            values = [sample[argument] for sample in samples]
            if any(value is None for value in values):
                assert any(isinstance(value, torch.Tensor) for value in values), (name, argument)
