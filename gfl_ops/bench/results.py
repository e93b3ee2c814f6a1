"""Results as data: the environment of a run, the JSON document it writes, where GPU runs
keep it, and reading a saved one back (benchmarks/results/*.json included)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .cases import BETA, CHANNEL_FIRST_BATCH, POSITIVE_FRACTION
from .measure import device_name
from .runner import Settings, add_fp32_ratios

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # gfl_ops/


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def load_average() -> Optional[List[float]]:
    """1, 5 and 15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    from .. import __version__

    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        device=dict(
            type=device.type, name=device_name(device), threads=torch.get_num_threads(), cpu_count=os.cpu_count()
        ),
        versions=dict(
            gfl_ops=__version__,
            torch=torch.__version__,
            triton=_package_version("triton"),
            cuda=torch.version.cuda,
            python=platform.python_version(),
        ),
        package=str(PACKAGE_DIR),  # which copy of gfl_ops ran: a checkout or an installed one
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        platform=platform.platform(),
        load_average=load_average(),
    )


def results_document(
    rows: List[dict],
    settings: Settings,
    argv: Sequence[str],
    env: Optional[dict] = None,
    not_run: Optional[Dict[str, str]] = None,
    notes: Sequence[str] = (),
) -> dict:
    """The JSON of a run: its environment, its configuration, {provider: why it did not run}
    for each one it wanted and could not run, its notes, and every row."""
    document = dict(env or environment(settings.device))
    document.update(
        load_average_after=load_average(),
        config=dict(
            argv=list(argv),
            modes=list(settings.modes),
            providers=None if settings.providers is None else list(settings.providers),
            repeats=settings.repeats,
            warmup=settings.warmup,
            compile_backend=settings.compile_backend,
            beta=BETA,
            positive_fraction=POSITIVE_FRACTION,
            channel_first_batch=CHANNEL_FIRST_BATCH,
            statistic="median",
            memory=settings.measure_memory,
        ),
        not_run=dict(not_run or {}),
        notes=list(notes),
        rows=rows,
    )
    return document


def load_results(path: Path) -> dict:
    """A saved document, as a run of today's harness would have written it: rows of older
    files get the fields added since (fp32_ratio), and not_run / notes default to empty."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
        raise ValueError(f"{path}: not a gfl_ops bench results file (no 'rows' list)")
    document.setdefault("not_run", {})
    document.setdefault("notes", [])
    add_fp32_ratios(document["rows"])
    return document


def checkout_root() -> Optional[Path]:
    """The source checkout this package sits in, or None where it is installed."""
    root = PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "benchmarks" / "results").is_dir() else None


def default_results_path(device: torch.device) -> Path:
    """benchmarks/results/<device>.json (GPU runs keep their numbers): the checkout's, or
    the working directory's where gfl_ops is installed."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name(device)).strip("_")
    return (checkout_root() or Path.cwd()) / "benchmarks" / "results" / f"{name}.json"
