// The CUDA registrations of the gfl_ops operators: the kernels of gfl_kernels.cuh launched
// on the current stream of pred's device (a device guard around every call).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>

namespace gfl {
namespace cuda {

// kernel<<<blocks, threads, 0, stream>>>(args...), checked: gfl_kernels.cuh launches
// through this so that its kernels also run under the emulator of tests/cuda_emulation/.
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

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_cuda(const at::Tensor& pred, const at::Tensor& label,
                                                           const at::Tensor& score,
                                                           const std::optional<at::Tensor>& weight, double beta,
                                                           bool activated, c10::string_view reduction,
                                                           bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return quality_focal_loss_impl(pred, label, score, weight, beta, activated, reduction, compute_grad,
                                 cuda::QflLaunch{c10::cuda::getCurrentCUDAStream(), pred.options()});
}

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_dense_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 double beta, bool activated,
                                                                 c10::string_view reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return quality_focal_loss_dense_impl(pred, target, weight, beta, activated, reduction, compute_grad,
                                       cuda::QflLaunch{c10::cuda::getCurrentCUDAStream(), pred.options()});
}

std::tuple<at::Tensor, at::Tensor> distribution_focal_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                c10::string_view reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return distribution_focal_loss_impl(pred, target, weight, reduction, compute_grad,
                                      cuda::DflLaunch{c10::cuda::getCurrentCUDAStream(), pred.options()});
}

std::tuple<at::Tensor, at::Tensor> distribution_integral_cuda(const at::Tensor& pred, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return distribution_integral_impl(pred, compute_grad, cuda::IntegralLaunch{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) {
  m.impl("quality_focal_loss", &quality_focal_loss_cuda);
  m.impl("quality_focal_loss_dense", &quality_focal_loss_dense_cuda);
  m.impl("distribution_focal_loss", &distribution_focal_loss_cuda);
  m.impl("distribution_integral", &distribution_integral_cuda);
}

}  // namespace gfl
