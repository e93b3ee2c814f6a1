"""Reading GPU machine code with cuobjdump (Triton's wheel bundles it; the CUDA toolkit has
it too): each kernel's registers, stack frame (where spilled registers go), local and
shared memory, and the widths of its global loads and stores in SASS."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_WIDTH = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9]+)*)")
_RESOURCES = re.compile(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ACCESS_BITS = ("64", "128", "U8", "S8", "U16", "S16")


def cuobjdump() -> Optional[str]:
    """Triton's bundled cuobjdump, else the toolkit's, else None."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("cuobjdump") or os.path.join(
        os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"
    )
    return found if os.path.exists(found) else None


def run(*arguments: str) -> str:
    return subprocess.run([cuobjdump(), *arguments], capture_output=True, text=True, check=True).stdout


def _parse_resources(listing: str) -> Dict[str, dict]:
    return {
        name: dict(registers=int(reg), stack_bytes=int(stack), shared_bytes=int(shared), local_bytes=int(local))
        for name, reg, stack, shared, local in _RESOURCES.findall(listing)
    }


def resources(path: str) -> Dict[str, dict]:
    """Mangled kernel name -> registers, stack_bytes, shared_bytes, local_bytes."""
    return _parse_resources(run("--dump-resource-usage", path))


def access_widths(sass: str) -> Dict[str, Dict[str, int]]:
    """{"loads": {bits: count}, "stores": {...}} of one kernel's SASS ("32" for plain LDG.E)."""
    widths: Dict[str, Dict[str, int]] = {"LDG": {}, "STG": {}}
    for kind, suffix in _WIDTH.findall(sass):
        bits = next((part for part in suffix.split(".") if part in _ACCESS_BITS), "32")
        widths[kind][bits] = widths[kind].get(bits, 0) + 1
    return {"loads": widths["LDG"], "stores": widths["STG"]}


def _parse_sass(listing: str) -> Dict[str, str]:
    kernels = {}
    for block in re.split(r"\n\s*Function : ", listing)[1:]:
        name, _, body = block.partition("\n")
        kernels[name.strip()] = body
    return kernels


def sass_by_kernel(path: str) -> Dict[str, str]:
    """Mangled kernel name -> its SASS."""
    return _parse_sass(run("--dump-sass", path))


def _elf_sections(dump: str) -> List[Tuple[str, str]]:
    """(architecture, listing) of each ELF of a fat binary's cuobjdump output (a library
    holds one per translation unit and architecture)."""
    sections = []
    for section in re.split(r"\n\s*Fatbin elf code:\s*\n=+\n", "\n" + dump)[1:]:
        arch = re.search(r"arch = (sm_\w+)", section)
        sections.append((arch.group(1) if arch else "unknown", section))
    return sections


def _per_architecture(listing: str, parse) -> Dict[Tuple[str, str], object]:
    """(architecture, mangled kernel name) -> parse's value, over every ELF of a library's
    listing; a kernel instantiated in several translation units is listed once."""
    found = {}
    for arch, section in _elf_sections(listing):
        for name, value in parse(section).items():
            found.setdefault((arch, name), value)
    return found


def library_resources(path: str) -> Dict[Tuple[str, str], dict]:
    """(architecture, mangled kernel name) -> resources (see resources), every ELF of a library."""
    return _per_architecture(run("--dump-resource-usage", path), _parse_resources)


def library_sass(path: str) -> Dict[Tuple[str, str], str]:
    """(architecture, mangled kernel name) -> its SASS, every ELF of a library."""
    return _per_architecture(run("--dump-sass", path), _parse_sass)
