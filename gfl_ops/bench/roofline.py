"""The memory floor of a case: the bytes its step must move (ops.bytes_moved, the byte model)
over a GPU's copy bandwidth. A fused loss step reads and writes little more than
pred and its gradient, so it is bandwidth-bound: the floor is the fastest it could run.

The bandwidths are the copy speeds (dst.copy_(src), read + write) these GPUs reach, not
their datasheet peaks: about 3.0 TB/s on an H100 SXM (80 GB HBM3) and 4.3 TB/s on an H200
(141 GB HBM3e). They are not yet this project's own measurement: a GPU run's copy
yardstick (the benchmark's % copy column) should replace them. On a GPU of one of these
kinds the row also gets the fraction of its floor that it reached.
"""

from __future__ import annotations

from typing import Optional

# Copy bandwidth in bytes per second, by a name that the GPU's device name contains.
COPY_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def floor_ms(num_bytes: int, gpu: str) -> float:
    """The time to move num_bytes at the GPU's copy bandwidth, in milliseconds."""
    return num_bytes / COPY_BANDWIDTH[gpu] * 1e3


def floor_fields(num_bytes: int) -> dict:
    """floor_ms_h100, floor_ms_h200: the case's floor on each GPU."""
    return {f"floor_ms_{gpu.lower()}": floor_ms(num_bytes, gpu) for gpu in COPY_BANDWIDTH}


def gpu_kind(device_name: str) -> Optional[str]:
    """The COPY_BANDWIDTH key the device is, or None (a CPU, another GPU)."""
    return next((gpu for gpu in COPY_BANDWIDTH if gpu in device_name.upper()), None)


def floor_fraction(num_bytes: int, median_ms: float, device_name: str) -> Optional[float]:
    """floor / median on an H100 or H200 (1.0: at the floor); None elsewhere."""
    gpu = gpu_kind(device_name)
    return None if gpu is None else floor_ms(num_bytes, gpu) / median_ms
