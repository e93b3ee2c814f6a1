// The CUDA kernels of focal and varifocal (gfl_cuda_device.cuh).
#include "gfl_cuda_device.cuh"

namespace gfl {

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) { register_native_kernels<CudaDevice>(m, FocalFamilyOperators{}); }

}  // namespace gfl
