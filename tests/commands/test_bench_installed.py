"""The benchmark from an installed copy of gfl_ops, not from the checkout.

`pip install .` puts the packages that setup.py lists, and the built extension, into
site-packages, and nothing else of the repository. The test does the same without
rebuilding the extension: setup.py's build_py lays the packages out in a temporary
directory as an install would (so a module or subpackage that setup.py leaves out is
missing there too), the checkout's built gfl_ops/_C*.so is copied beside them, and
`python -m gfl_ops bench` runs in a subprocess whose path takes gfl_ops from that directory
(the working directory elsewhere; the checkout only for the mmcv.ops stand-in of tools/).
Every provider that the checkout runs, the frameworks' peers included, must run in the
copy, and each one that does not run must be named with its reason in the output and the
JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _cuda_emulation
import gfl_ops
from gfl_ops import bench
from tools import mmcv_ops_standin

mmcv_ops_standin.install()  # mmdetection's losses on mmcv-lite: the benchmark's mmdet peer
CHECKOUT = Path(__file__).resolve().parents[2]

# The smallest run the harness allows that still takes every provider through QFL in both
# layouts and DFL: tiny shapes, one round, no warm-up, no memory step, torch.compile's
# aot_eager backend (the same traced graphs as inductor, without generating C++).
TINY_RUN = [
    "bench", "--device", "cpu", "--quick", "--qfl-shapes", "64x5", "--dfl-shapes", "32x17",
    "--repeats", "1", "--warmup", "0", "--no-memory", "--compile-backend", "aot_eager",
]  # fmt: skip


def _install_copy(site: Path) -> Path:
    """gfl_ops as `pip install .` lays it out in site-packages, with this checkout's build."""
    checkout = Path(gfl_ops.__file__).resolve().parent.parent
    if not (checkout / "setup.py").is_file():
        pytest.skip("gfl_ops is not imported from a source checkout")
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)],
        cwd=checkout, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    for extension in (checkout / "gfl_ops").glob("_C*.so"):
        shutil.copy2(extension, site / "gfl_ops" / extension.name)
    return site / "gfl_ops"


@pytest.mark.skipif(
    os.environ.get(_cuda_emulation.ENVIRONMENT_SWITCH) == "1",
    reason="the installed copy runs the real kernels in a subprocess: once, outside the emulated suite",
)
def test_an_installed_copy_runs_every_provider_of_the_checkout(tmp_path):
    site, elsewhere = tmp_path / "site-packages", tmp_path / "elsewhere"
    elsewhere.mkdir()
    package = _install_copy(site)
    json_path = tmp_path / "bench.json"
    # The copy first: gfl_ops and its subpackages come from it. The checkout after it, for
    # tools/ alone: mmcv-lite gets the stand-in of mmcv.ops, as in this process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(CHECKOUT)]))
    result = subprocess.run(
        [sys.executable, "-m", "tools.mmcv_ops_standin", "gfl_ops", *TINY_RUN, "--json", str(json_path)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    document = json.loads(json_path.read_text())
    assert Path(document["package"]) == package  # the copy ran, not the checkout
    ops = ["qfl", "dfl"]
    cpu = torch.device("cpu")
    expected = {name for op in ops for name in bench.select_providers(op, cpu)[0]}
    assert "mmdet" in expected or os.environ.get("GFL_OPS_REQUIRE_FRAMEWORKS") != "1"
    ran = {row["provider"] for row in document["rows"] if row["error"] is None}
    assert ran == expected, f"providers of the checkout missing from the installed copy: {expected - ran}"
    assert all(row["error"] is None for row in document["rows"])

    # Every provider either ran or is named with its reason, in the JSON and the output.
    assert document["not_run"] == bench.not_run(ops, cpu)
    applicable = {name for op in ops for name in bench.provider_status(op, cpu)}  # the ops' peers only
    assert applicable == ran | set(document["not_run"])
    for name, reason in document["not_run"].items():
        assert reason and f"not run: {name}: {reason}" in result.stdout
