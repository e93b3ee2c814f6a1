"""pytest configuration of the gfl_ops suite: hypothesis profile, import path, seeding."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# The helper module lives next to the tests (tests/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


@pytest.fixture(autouse=True)
def _seed_torch():
    """Tests draw their inputs from explicit generators; this only pins anything else."""
    torch.manual_seed(0)
    yield
