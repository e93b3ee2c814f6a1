// The CUDA kernels of focal and varifocal (gfl_cuda_device.cuh).
#include "gfl_cuda_device.cuh"

namespace gfl {

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) { register_focal_family_kernels<CudaDevice>(m); }

}  // namespace gfl
