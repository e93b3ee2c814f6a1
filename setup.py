"""Builds gfl_ops._C: the fused C++ CPU kernels always, the CUDA kernels (csrc/cuda/*.cu)
whenever nvcc and a CUDA build of torch are present, with or without a GPU.

Environment:
  GFL_OPS_FORCE_CPU=1       build without CUDA even where it could be built
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build (torch's variable; see README)
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension


def cuda_build_possible() -> bool:
    if os.environ.get("GFL_OPS_FORCE_CPU") == "1":
        return False
    import torch

    cuda_home = cpp_extension.CUDA_HOME
    return (
        torch.version.cuda is not None
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    )


def default_cuda_arch_list() -> str:
    """Turing through Hopper, plus Blackwell where both the toolkit (CUDA 12.8+) and torch
    (2.7+, whose cpp_extension rejects unknown architectures) have it, and PTX of the
    newest for GPUs after it. TORCH_CUDA_ARCH_LIST, when set, wins (`make` sets 9.0 for CI)."""
    import re
    import subprocess

    import torch

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    release = re.search(r"release (\d+)\.(\d+)", subprocess.check_output([nvcc, "--version"], text=True))
    toolkit = (int(release.group(1)), int(release.group(2))) if release else (0, 0)
    torch_version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    if toolkit >= (12, 8) and torch_version >= (2, 7):
        archs += ["10.0", "12.0"]
    return ";".join(archs) + "+PTX"


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into this library; without the
    # flag it silently runs on one thread. -g0: Python's own flags ask for debug information,
    # which for these thousands of template instantiations costs build time and most of the
    # library's size.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if cuda_sources and cuda_build_possible():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_cuda_arch_list())
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "gfl_ops._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DGFL_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=False,
        )
    return cpp_extension.CppExtension(
        "gfl_ops._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=False,
    )


# The package's metadata, version and files: pyproject.toml.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
