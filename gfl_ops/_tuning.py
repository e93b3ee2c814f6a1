"""The tuning table: the kernel backend that backend="auto" runs per CUDA device, operator
and dtype, and the device's gradient pass, as the benchmark measured them.

Where it is read from: gfl_ops/tuning.json in the package (no such file ships: `python -m
gfl_ops tune` writes it from benchmark results), or the file GFL_OPS_TUNING=<path> names;
GFL_OPS_TUNING= (set empty) runs without a table. It is read once, at import; without a
file that costs one os.path.exists, and "auto" keeps its fixed order (gfl_ops/_backends.py).
A file GFL_OPS_TUNING names that does not exist, or a malformed table, fails the import
with the file and the problem named: a table asked for is never skipped silently.

The format: one entry per CUDA device name, the string torch.cuda.get_device_name returns
(and the benchmark records as device.name):

    {"NVIDIA H200": {
        "backends": {"quality_focal_loss": {"float32": "triton", "bfloat16": "native"}, ...},
        "gradient_pass": "backward",
        "native_over_triton": {"quality_focal_loss": {"float32": {"ratio": 1.93, "cases": 20}}},
        "forward_over_backward": {"ratio": 1.04, "cases": 60},
        "source": [{"file": "NVIDIA_H200.json", "gradient_pass": "backward",
                    "date": "2026-12-02T03:59:46+00:00", "git_commit": "4bacd91..."}, ...]}}

Only "backends" (operator -> dtype name -> "native" | "triton") and "gradient_pass"
("forward" | "backward"; absent where it was not measured) steer anything; the ratios and
the source files are the record of how they were chosen.

How `python -m gfl_ops tune` derives an entry from benchmark results: gfl_ops/tune.py.
CPU devices are not tuned: Triton runs on CUDA tensors only, so there is nothing to choose.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from ._ops import KERNEL_BACKENDS, OPERATORS

ENVIRONMENT_VARIABLE = "GFL_OPS_TUNING"
PACKAGE_TABLE = Path(__file__).resolve().parent / "tuning.json"
GRADIENT_PASSES = ("forward", "backward")
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}

# --------------------------------------------------------------------------------------
# Reading the table
# --------------------------------------------------------------------------------------


def table_path() -> Optional[Path]:
    """The table's file: the one GFL_OPS_TUNING names, None where it is set empty, the
    package's tuning.json where it is not set."""
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value is None:
        return PACKAGE_TABLE
    return Path(value) if value else None


def load_table() -> Dict[str, dict]:
    """The table of table_path(), {} where there is none. The package's file may be absent;
    a file GFL_OPS_TUNING names must exist."""
    path = table_path()
    if path is None:
        return {}
    if not os.path.exists(path):
        if os.environ.get(ENVIRONMENT_VARIABLE):
            raise FileNotFoundError(
                f"{ENVIRONMENT_VARIABLE}={path}: no such file (set {ENVIRONMENT_VARIABLE}= empty to run without one)"
            )
        return {}
    return read_table(path)


def read_table(path: Path) -> Dict[str, dict]:
    """The table in `path`, checked: a ValueError names the file, the device and the problem."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"tuning table {path}: not readable as JSON ({error})") from error
    if not isinstance(table, dict):
        raise ValueError(f"tuning table {path}: expected an object of device names, got {type(table).__name__}")
    for device_name, entry in table.items():
        _check_entry(entry, f"tuning table {path}, device {device_name!r}")
    return table


def _check_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("backends"), dict):
        raise ValueError(f"{where}: expected an object with a 'backends' object, got {entry!r}")
    for operator, by_dtype in entry["backends"].items():
        if operator not in OPERATORS:
            raise ValueError(f"{where}: unknown operator {operator!r} (operators: {OPERATORS})")
        if not isinstance(by_dtype, dict) or not all(
            dtype in DTYPE_NAMES.values() and isinstance(backend, str) and backend in KERNEL_BACKENDS
            for dtype, backend in by_dtype.items()
        ):
            raise ValueError(
                f"{where}: backends of {operator} must map dtype names {tuple(DTYPE_NAMES.values())} "
                f"to one of {KERNEL_BACKENDS}, got {by_dtype!r}"
            )
    if "gradient_pass" in entry and entry["gradient_pass"] not in GRADIENT_PASSES:
        raise ValueError(f"{where}: gradient_pass must be one of {GRADIENT_PASSES}, got {entry['gradient_pass']!r}")


TABLE: Dict[str, dict] = load_table()

# --------------------------------------------------------------------------------------
# Looking a device up
# --------------------------------------------------------------------------------------

# {CUDA device index: its name}, filled by the first lookup of each index.
_CUDA_DEVICE_NAMES: Dict[int, str] = {}


def cuda_device_name(device: torch.device) -> Optional[str]:
    """torch.cuda.get_device_name of `device`, cached per index. None under torch.compile's
    tracing while it is not cached yet: reading it there would call into CUDA."""
    if device.index in _CUDA_DEVICE_NAMES:
        return _CUDA_DEVICE_NAMES[device.index]
    if torch.compiler.is_compiling():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _CUDA_DEVICE_NAMES:
        _CUDA_DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _CUDA_DEVICE_NAMES[index]


def _device_entry(device: torch.device) -> Optional[dict]:
    # The table is checked first, so that without one no lookup touches CUDA.
    if not TABLE or device.type != "cuda":
        return None
    name = cuda_device_name(device)
    return None if name is None else TABLE.get(name)


def tuned_backend(device: torch.device, operator: str, dtype: torch.dtype) -> Optional[str]:
    """ "native" or "triton", whichever ran `operator` faster on pred of `dtype` on this
    device; None where the table does not say."""
    entry = _device_entry(device)
    if entry is None:
        return None
    return entry["backends"].get(operator, {}).get(DTYPE_NAMES.get(dtype))


def tuned_gradient_pass(device: torch.device) -> Optional[str]:
    """ "forward" or "backward", whichever was faster on this device; None where the table
    does not say."""
    entry = _device_entry(device)
    return None if entry is None else entry.get("gradient_pass")
