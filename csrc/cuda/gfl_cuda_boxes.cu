// The CUDA kernels of DFL and the integral (gfl_cuda_device.cuh).
#include "gfl_cuda_device.cuh"

namespace gfl {

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) { register_native_kernels<CudaDevice>(m, BoxOperators{}); }

}  // namespace gfl
