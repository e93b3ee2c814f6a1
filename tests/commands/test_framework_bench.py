"""The framework benchmark (python -m tools.framework_step) runs its steps: at small
sizes here, stock and fused, and reports one row per framework."""

from __future__ import annotations

import pytest
import torch

from _frameworks import import_framework

pytestmark = pytest.mark.frameworks
import_framework("mmdet")
import_framework("ultralytics")

from tools import framework_step as frameworks  # noqa: E402

SMALL = {
    "mmdet": lambda device: frameworks._gfl_head_steps(device, images=1, height=160, width=224),
    "ultralytics": lambda device: frameworks._yolov8_loss_steps(device, batch=2, size=128),
}


@pytest.mark.parametrize("framework", sorted(SMALL))
def test_framework_steps_run(framework):
    steps = SMALL[framework](torch.device("cpu"))
    assert set(steps) == {"stock", "fused", "assignment"}
    for step in steps.values():
        step()


def test_run_reports_a_row_per_framework(monkeypatch, capsys):
    monkeypatch.setattr(frameworks, "FRAMEWORK_STEPS", {f"{name} (small)": build for name, build in SMALL.items()})
    rows = frameworks.run(torch.device("cpu"), repeats=1, warmup=0)
    assert [row["step"] for row in rows] == ["mmdet (small)", "ultralytics (small)"]
    for row in rows:
        assert row["stock_s"] > 0 and row["fused_s"] > 0 and row["speedup"] == row["stock_s"] / row["fused_s"]
    assert "of the stock step" in capsys.readouterr().out
