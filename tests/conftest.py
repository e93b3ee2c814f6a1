"""pytest configuration of the gfl_ops suite: hypothesis profile, import path, seeding."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The helper module lives next to the tests (tests/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# backend="auto" in its fixed order, whatever tuning table this machine has (gfl_ops/_tuning.py;
# tests/test_tuning.py sets its tables itself). Before gfl_ops is imported, which reads it.
os.environ["GFL_OPS_TUNING"] = ""

import _cuda_emulation  # noqa: E402

# A run whose backend="native" is the CUDA kernels, emulated on CPU tensors
# (test_cuda_emulation.py starts one over the whole suite).
EMULATED_CUDA = os.environ.get(_cuda_emulation.ENVIRONMENT_SWITCH) == "1"
if EMULATED_CUDA:
    _cuda_emulation.route_native_operators()


def pytest_terminal_summary(terminalreporter):
    if EMULATED_CUDA:
        terminalreporter.write_line(
            f"backend='native' ran the emulated CUDA kernels of torch.ops.{_cuda_emulation.NAMESPACE}: "
            f"{_cuda_emulation.take_wide_access_count()} vector accesses"
        )

# Modest example counts: the suite runs on 2-core CI machines. deadline=None because the
# first call of a kernel (and torch's lazy initialisation) can take longer than 200 ms.
# database=None keeps the working tree free of .hypothesis/ folders.
settings.register_profile(
    "gfl_ops",
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("GFL_OPS_HYPOTHESIS_PROFILE", "gfl_ops"))


@pytest.fixture
def set_gradient_pass():
    """gfl_ops._ops.set_gradient_pass(device_type, "forward" | "backward") for one test: every
    device's setting is restored after it."""
    import gfl_ops

    saved = {device_type: gfl_ops._ops.gradient_pass(device_type) for device_type in ("cpu", "cuda")}
    yield gfl_ops._ops.set_gradient_pass
    for device_type, gradient_pass in saved.items():
        gfl_ops._ops.set_gradient_pass(device_type, gradient_pass)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Tests draw their inputs from explicit generators; this only pins anything else."""
    torch.manual_seed(0)
    yield
