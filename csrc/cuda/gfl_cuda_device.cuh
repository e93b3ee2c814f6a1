// The CUDA device of the gfl_ops operators: the kernels of gfl_kernels.cuh launched on the
// current stream of pred's device, a device guard around every call. Included by the three
// translation units that register them (gfl_cuda_quality.cu, gfl_cuda_focal_family.cu,
// gfl_cuda_boxes.cu: see register_native_kernels in gfl_operators.h), which nvcc compiles in
// parallel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>

namespace gfl {
namespace cuda {

// kernel<<<blocks, threads, 0, stream>>>(args...), checked: gfl_kernels.cuh launches
// through this so that its kernels also run under the emulator of tests/cuda/cuda_emulation/.
template <typename... KernelParams, typename... Args>
void launch_kernel(void (*kernel)(KernelParams...), int blocks, int threads, cudaStream_t stream, Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace gfl

#include "gfl_kernels.cuh"

namespace gfl {
namespace {

// The CUDA launchers, for NativeKernel (gfl_operators.h): pred's device is current (the guard)
// when they are made, so the stream is that device's.
struct CudaDevice {
  using Guard = c10::cuda::CUDAGuard;
  static cuda::ClassLaunch classification(const at::Tensor& pred) {
    return {c10::cuda::getCurrentCUDAStream(), pred.options()};
  }
  static cuda::DflLaunch dfl(const at::Tensor& pred) { return {c10::cuda::getCurrentCUDAStream(), pred.options()}; }
  static cuda::IntegralLaunch integral(const at::Tensor& /*pred*/) { return {c10::cuda::getCurrentCUDAStream()}; }
};

}  // namespace
}  // namespace gfl
