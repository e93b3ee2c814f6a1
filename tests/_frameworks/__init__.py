"""Helpers of the framework tests (tests/integrations/test_framework_*.py)."""

from __future__ import annotations

import importlib
import os

import pytest


def import_framework(name: str):
    """The framework's module; a skip with the reason when it is absent, unless
    GFL_OPS_REQUIRE_FRAMEWORKS=1 (make test sets it, after installing the frameworks), where
    an absent framework is an error: CI must run these tests, not skip them."""
    if os.environ.get("GFL_OPS_REQUIRE_FRAMEWORKS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (make frameworks installs it)")
