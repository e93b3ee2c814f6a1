"""What a user pip-installs works: the sdist holds every source and header the build needs,
a wheel built from it in a fresh directory installs, and the installed copy, imported
outside the source tree, has its CPU kernels, passes `python -m gfl_ops verify --device
cpu`, and imports no tooling (benchmark harness, machine-code readers, commands).

The wheel is built without the CUDA kernels (GFL_OPS_FORCE_CPU=1): the sdist's CUDA
sources and headers are checked by name, and their build by every other tier.
"""

import glob
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]

# Imported by `import gfl_ops`: the operators, functional API, modules, reference and
# backends; never the commands or the benchmark (python -m gfl_ops loads those).
RUNTIME_CHECK = """
import json, sys
import gfl_ops
assert gfl_ops.__file__.startswith(sys.argv[1]), gfl_ops.__file__
assert gfl_ops.available_backends("cpu")[0] == "native", gfl_ops.available_backends("cpu")
tooling = sorted(name for name in sys.modules
                 if name.startswith(("gfl_ops.bench", "gfl_ops.tune", "gfl_ops.verify", "gfl_ops._command_line"))
                 or name.split(".")[0] in ("cubin", "cuda_machine_code", "triton_machine_code", "mmcv_ops_standin",
                                           "framework_step", "tests"))
print(json.dumps(tooling))
"""


def _run(command, cwd, env=None):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(the sdist's unpacked source folder, its member paths relative to that folder)."""
    work = tmp_path_factory.mktemp("sdist")
    _run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(work / "dist"), str(ROOT)],
        cwd=ROOT,
    )
    (archive_path,) = glob.glob(str(work / "dist" / "*.tar.gz"))
    with tarfile.open(archive_path) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(work / "unpacked", filter="data")
    (source,) = glob.glob(str(work / "unpacked" / "gfl_ops-*"))
    return Path(source), names


@pytest.fixture(scope="module")
def site(sdist, tmp_path_factory):
    """The site folder holding the wheel built from the sdist, installed."""
    source, _ = sdist
    work = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, GFL_OPS_FORCE_CPU="1", MAX_JOBS=str(os.cpu_count() or 1))
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    _run([*wheel_command, "-w", str(work / "wheel"), str(source)], cwd=work, env=env)
    (wheel,) = glob.glob(str(work / "wheel" / "gfl_ops-*.whl"))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(work / "site"), wheel], cwd=work)
    return work / "site"


def _outside_tree_env(site: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env["GFL_OPS_TUNING"] = ""
    return env


def test_sdist_holds_every_source_and_header(sdist):
    """Each file under csrc/ that git tracks is in the sdist (the headers are not sources
    to setuptools: MANIFEST.in brings them)."""
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True, check=True)
    if not tracked.stdout:
        pytest.skip("not a git checkout: the tracked csrc files are unknown")
    _, names = sdist
    missing = sorted(set(tracked.stdout.split()) - names)
    assert not missing, f"left out of the sdist: {missing}"


def test_installed_wheel_imports_no_tooling(site):
    output = _run([sys.executable, "-c", RUNTIME_CHECK, str(site)], cwd=site.parent, env=_outside_tree_env(site))
    assert output.strip() == "[]", f"import gfl_ops imported tooling: {output}"


def test_installed_wheel_verifies_on_cpu(site):
    output = _run(
        [sys.executable, "-m", "gfl_ops", "verify", "--device", "cpu"], cwd=site.parent, env=_outside_tree_env(site)
    )
    assert re.search(r"backends \['native'", output), output
    assert re.search(r"\n[1-9]\d* passed, 0 failed", output), output


def test_installed_wheel_holds_no_tooling(site):
    shipped = sorted(str(path.relative_to(site)) for path in (site / "gfl_ops").rglob("*.py"))
    tooling = [
        name
        for name in shipped
        if Path(name).stem
        in ("cubin", "cuda_machine_code", "triton_machine_code", "machine_code", "mmcv_ops_standin", "frameworks")
    ]
    assert not tooling, tooling
