"""Argument types shared by the commands (python -m gfl_ops bench | verify | tune): each
refuses a bad value when the arguments are parsed, with argparse's usage error, rather than
with a traceback, or after a run whose results it would then lose."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def device_argument(text: str) -> torch.device:
    """A device torch knows, and (cuda) one this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({error})") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: gfl_ops runs on cpu and cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def writable_file_argument(text: str) -> Path:
    """A file this process may write: an existing writable file, or a new one in a folder
    that exists or can be made (its nearest existing ancestor is a writable folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r} is not writable")
        return path
    ancestor = path.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {ancestor} is not a writable folder")
    return path


def existing_file_argument(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return path
