"""benchmarks/gpu_workload.py, the workload the GPU session runs under the sanitizers, on the
CPU's native kernels: every call runs, and every registered operator is in it."""

import gfl_ops
from benchmarks import gpu_workload


def test_the_workload_runs_every_registered_operator():
    samples = gpu_workload.registered_samples("cpu")
    for dtype in gpu_workload.DTYPES:
        assert {name for name, _ in samples[dtype]} == set(gfl_ops._registry.OPERATORS), dtype
    ran = gpu_workload.workload("cpu", ["native"], samples)
    assert ran > sum(len(samples[dtype]) for dtype in gpu_workload.DTYPES)
