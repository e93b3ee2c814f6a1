"""pytest configuration of the gfl_ops suite: hypothesis profile, import path, seeding."""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The helper module lives next to the tests (tests/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# backend="auto" in its fixed order, whatever tuning table this machine has (gfl_ops/_tuning.py;
# tests/commands/test_tuning.py sets its tables itself). Before gfl_ops is imported, which reads it.
os.environ["GFL_OPS_TUNING"] = ""

import _cuda_emulation  # noqa: E402

# A run whose backend="native" is the CUDA kernels, emulated on CPU tensors (make
# test-emulated starts one over the whole suite).
EMULATED_CUDA = os.environ.get(_cuda_emulation.ENVIRONMENT_SWITCH) == "1"
if EMULATED_CUDA:
    _cuda_emulation.route_native_operators()


def pytest_configure(config):
    """A run meant for the Triton interpreter (make test-triton-interpreter) where Triton
    does not import would skip every Triton case and pass with nothing checked: refused."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import gfl_ops

        if gfl_ops.triton.IMPORT_ERROR is not None:
            raise pytest.UsageError(f"TRITON_INTERPRET=1, but Triton does not import: {gfl_ops.triton.IMPORT_ERROR}")


def pytest_sessionfinish(session, exitstatus):
    """An emulated run whose tests reached no emulated kernel (the routing broken, or every
    case skipped) checked nothing: it fails."""
    if not EMULATED_CUDA or session.testscollected == 0:
        return
    session.config.emulated_vector_accesses = _cuda_emulation.take_wide_access_count()
    if session.config.emulated_vector_accesses == 0 and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if EMULATED_CUDA:
        accesses = getattr(terminalreporter.config, "emulated_vector_accesses", 0)
        terminalreporter.write_line(
            f"backend='native' ran the emulated CUDA kernels of torch.ops.{_cuda_emulation.NAMESPACE}: "
            f"{accesses} vector accesses" + ("" if accesses else ": none, so this run checked nothing and fails")
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
