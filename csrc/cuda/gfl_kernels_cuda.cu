// CUDA kernels: the walks of the CPU kernels mapped onto threads; the maths is the very
// same ../gfl_math.h. One pass over pred per call; no host sync; the current stream.
//
//   QFL, classes contiguous ((N, C), channels-last): a warp per anchor, lanes over classes,
//       the anchor's sum reduced by warp shuffles in a fixed tree (deterministic);
//   QFL, anchors contiguous ((B, C, H, W) read in place) or any other layout: a thread per
//       anchor walking its classes with math::qfl_anchor, neighbouring threads reading
//       neighbouring anchors of a class plane (coalesced);
//   DFL and the integral: a thread per row of n + 1 bins, math::dfl_row / integral_row.
//
// All offsets are 64-bit; grids stride over the work, so any N x C fits.
#include "../gfl_host.h"
#include "../gfl_math.h"
#include "../gfl_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace gfl {
namespace {

using math::LossAndGrad;

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
// Grid-stride loops cover whatever the grid does not; this many blocks fill any GPU.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int blocks_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // complete in lane 0
}

// ---------------------------------------------------------------------------------------
// Reduction "sum": the per-anchor losses added up in a fixed order, so that the sum has the
// same bits run after run (no atomics). A grid whose size depends only on the count adds
// up fixed sets of values (each thread in order, then a fixed tree over the block), and
// one block adds up the blocks' sums the same way. Two small launches on the stream; no
// host sync.
// ---------------------------------------------------------------------------------------

constexpr int64_t kMaxSumBlocks = 512;
constexpr int64_t kValuesPerSumThread = 8;

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) block_sums_kernel(const acc_t* values, int64_t count, acc_t* sums) {
  __shared__ acc_t partial[kThreads];
  acc_t sum = 0;
  for (int64_t i = global_thread(); i < count; i += grid_threads()) {
    sum += values[i];
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] += partial[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = partial[0];
  }
}

// *total = values[0] + ... + values[count - 1], count > 0, on `stream`.
template <typename acc_t>
void deterministic_sum(const acc_t* values, int64_t count, acc_t* total, cudaStream_t stream) {
  const int64_t blocks =
      std::clamp<int64_t>((count + kThreads * kValuesPerSumThread - 1) / (kThreads * kValuesPerSumThread), 1,
                          kMaxSumBlocks);
  const at::Tensor block_sums = at::empty(
      {blocks}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value).device(at::kCUDA, c10::cuda::current_device()));
  acc_t* sums = block_sums.mutable_data_ptr<acc_t>();
  block_sums_kernel<acc_t><<<static_cast<int>(blocks), kThreads, 0, stream>>>(values, count, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  block_sums_kernel<acc_t><<<1, kThreads, 0, stream>>>(sums, blocks, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------
// Quality Focal Loss
// ---------------------------------------------------------------------------------------

// A warp per anchor. Every lane of a warp runs the same anchors, so the shuffles see the
// whole warp.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads) qfl_warp_per_anchor_kernel(const QflArgs<scalar_t, acc_t, Target> args) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_classes = args.layout.num_classes;
  for (int64_t anchor = global_thread() / kWarpSize; anchor < args.layout.num_anchors;
       anchor += grid_threads() / kWarpSize) {
    const int64_t outer = anchor / args.layout.inner_size;
    const int64_t inner = anchor - outer * args.layout.inner_size;
    const scalar_t* pred = args.pred + args.pred_strides.outer_offset(outer, args.layout) + inner * args.pred_strides.inner_stride;
    scalar_t* grad = Variant::kNeedGrad
                         ? args.grad + args.grad_strides.outer_offset(outer, args.layout) + inner * args.grad_strides.inner_stride
                         : nullptr;
    const int64_t target_row =
        args.target_strides.outer_offset(outer, args.layout) + inner * args.target_strides.inner_stride;
    const acc_t weight = weight_at(args.weight, anchor);
    acc_t loss = 0;
    for (int64_t c = lane; c < num_classes; c += kWarpSize) {
      const acc_t y = args.target.at(anchor, c, target_row + c * args.target_strides.class_stride);
      const LossAndGrad<acc_t> element =
          math::qfl_element<Variant::kActivated, Variant::kBetaIsTwo, Variant::kNeedGrad>(
              static_cast<acc_t>(pred[c * args.pred_strides.class_stride]), y, args.beta);
      loss += element.loss;
      if (Variant::kNeedGrad) {
        grad[c * args.grad_strides.class_stride] = static_cast<scalar_t>(weight * element.grad);
      }
    }
    loss = warp_sum(loss);
    if (lane == 0) {
      args.loss[anchor] = weight * loss;
    }
  }
}

// A thread per anchor, walking its classes.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads) qfl_thread_per_anchor_kernel(const QflArgs<scalar_t, acc_t, Target> args) {
  for (int64_t anchor = global_thread(); anchor < args.layout.num_anchors; anchor += grid_threads()) {
    const int64_t outer = anchor / args.layout.inner_size;
    const int64_t inner = anchor - outer * args.layout.inner_size;
    scalar_t* grad = Variant::kNeedGrad
                         ? args.grad + args.grad_strides.outer_offset(outer, args.layout) + inner * args.grad_strides.inner_stride
                         : nullptr;
    args.loss[anchor] = math::qfl_anchor<Variant>(
        args.pred + args.pred_strides.outer_offset(outer, args.layout) + inner * args.pred_strides.inner_stride,
        args.pred_strides.class_stride, grad, args.grad_strides.class_stride, args.target, anchor,
        args.target_strides.outer_offset(outer, args.layout) + inner * args.target_strides.inner_stride,
        args.target_strides.class_stride, args.layout.num_classes, args.beta, weight_at(args.weight, anchor));
  }
}

struct CudaQflLaunch {
  template <typename scalar_t, typename acc_t, typename Target>
  void operator()(const QflArgs<scalar_t, acc_t, Target>& args, bool activated, bool compute_grad, QflWalk walk,
                  acc_t* total) const {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_qfl_variant(activated, args.beta == acc_t(2), compute_grad, [&](auto variant) {
      using Variant = decltype(variant);
      if (walk == QflWalk::kRows) {
        qfl_warp_per_anchor_kernel<Variant><<<blocks_for(args.layout.num_anchors * kWarpSize), kThreads, 0, stream>>>(args);
      } else {
        qfl_thread_per_anchor_kernel<Variant><<<blocks_for(args.layout.num_anchors), kThreads, 0, stream>>>(args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (total != nullptr) {
      deterministic_sum(args.loss, args.layout.num_anchors, total, stream);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_cuda(const at::Tensor& pred, const at::Tensor& label,
                                                           const at::Tensor& score,
                                                           const std::optional<at::Tensor>& weight, double beta,
                                                           bool activated, c10::string_view reduction,
                                                           bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return quality_focal_loss_impl(pred, label, score, weight, beta, activated, reduction, compute_grad,
                                 CudaQflLaunch{});
}

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_dense_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 double beta, bool activated,
                                                                 c10::string_view reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return quality_focal_loss_dense_impl(pred, target, weight, beta, activated, reduction, compute_grad,
                                       CudaQflLaunch{});
}

// ---------------------------------------------------------------------------------------
// Distribution Focal Loss and the integral: a thread per row.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) dfl_kernel(const BinRows<scalar_t> rows, const acc_t* target,
                                                       const acc_t* weight, acc_t* loss) {
  for (int64_t r = global_thread(); r < rows.num_rows; r += grid_threads()) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    loss[r] = math::dfl_row(rows.pred + r * rows.pred_row_stride, rows.pred_bin_stride, rows.num_bins, target[r],
                            weight_at(weight, r), grad, rows.grad_bin_stride);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) integral_kernel(const BinRows<scalar_t> rows, scalar_t* value) {
  for (int64_t r = global_thread(); r < rows.num_rows; r += grid_threads()) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    value[r] = static_cast<scalar_t>(math::integral_row<acc_t>(rows.pred + r * rows.pred_row_stride,
                                                               rows.pred_bin_stride, rows.num_bins, grad,
                                                               rows.grad_bin_stride));
  }
}

struct CudaDflLaunch {
  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* target, const acc_t* weight, acc_t* loss,
                  acc_t* total) const {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dfl_kernel<scalar_t, acc_t><<<blocks_for(rows.num_rows), kThreads, 0, stream>>>(rows, target, weight, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (total != nullptr) {
      deterministic_sum(loss, rows.num_rows, total, stream);
    }
  }
};

struct CudaIntegralLaunch {
  template <typename scalar_t>
  void operator()(const BinRows<scalar_t>& rows, scalar_t* value) const {
    using acc_t = math::acc_type_t<scalar_t>;
    integral_kernel<scalar_t, acc_t><<<blocks_for(rows.num_rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows, value);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> distribution_focal_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                c10::string_view reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return distribution_focal_loss_impl(pred, target, weight, reduction, compute_grad, CudaDflLaunch{});
}

std::tuple<at::Tensor, at::Tensor> distribution_integral_cuda(const at::Tensor& pred, bool compute_grad) {
  const c10::cuda::CUDAGuard device_guard(pred.device());
  return distribution_integral_impl(pred, compute_grad, CudaIntegralLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) {
  m.impl("quality_focal_loss", &quality_focal_loss_cuda);
  m.impl("quality_focal_loss_dense", &quality_focal_loss_dense_cuda);
  m.impl("distribution_focal_loss", &distribution_focal_loss_cuda);
  m.impl("distribution_integral", &distribution_integral_cuda);
}

}  // namespace gfl
