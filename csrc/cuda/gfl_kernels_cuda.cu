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
// Reduction "sum" is taken inside the loss kernels (per-block sums, then one block adds
// them up: see launch_loss_kernel). All offsets are 64-bit; grids stride over the work,
// so any N x C fits.
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
// Grid-stride loops cover whatever the grid does not. 8192 blocks (2M threads, several waves
// on an H100's 132 SMs) fill any GPU, and keep the per-block sums of reduction "sum" few
// enough for one block to add them up (32 KB). To tune by measurement on a GPU.
constexpr int64_t kMaxBlocks = 8192;

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
// Reduction "sum", inside the loss kernels: each thread adds up the losses it computes, each
// block adds up its threads' sums (a fixed tree in shared memory) into one value per block,
// and the blocks' values are added up the same way, in one block. The grid's size depends
// only on the anchor count, so every sum is taken in the same order run after run: the
// same bits, no atomics, no host sync, and no per-anchor loss vector.
// ---------------------------------------------------------------------------------------

// *out = the sum of every thread's `value`, in a fixed order. Every thread of the block
// (kThreads of them) must call it.
template <typename acc_t>
__device__ __forceinline__ void block_sum_to(acc_t value, acc_t* out) {
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] += partial[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *out = partial[0];
  }
}

// One block: *total = values[0] + ... + values[count - 1].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_kernel(const acc_t* values, int64_t count, acc_t* total) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    sum += values[i];
  }
  block_sum_to(sum, total);
}

// Where a loss kernel puts its losses: per anchor (reduction "none"), or one sum per block
// (reduction "sum", per_anchor null).
template <typename acc_t>
struct LossSink {
  acc_t* per_anchor;
  acc_t* block_sums;
};

// The launch of a loss kernel over `blocks` blocks: `kernel(sink)` on the stream, then,
// for reduction "sum", the blocks' sums added up into *total.
template <typename acc_t, typename Kernel>
void launch_loss_kernel(int blocks, acc_t* per_anchor, acc_t* total, cudaStream_t stream, const Kernel& kernel) {
  at::Tensor block_sums;
  if (total != nullptr) {
    block_sums = at::empty({blocks}, at::TensorOptions()
                                         .dtype(c10::CppTypeToScalarType<acc_t>::value)
                                         .device(at::kCUDA, c10::cuda::current_device()));
  }
  kernel(LossSink<acc_t>{per_anchor, total != nullptr ? block_sums.mutable_data_ptr<acc_t>() : nullptr});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (total != nullptr) {
    sum_kernel<acc_t><<<1, kThreads, 0, stream>>>(block_sums.const_data_ptr<acc_t>(), blocks, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------
// Quality Focal Loss
// ---------------------------------------------------------------------------------------

// A warp per anchor. Every lane of a warp runs the same anchors, so the shuffles see the
// whole warp.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads) qfl_warp_per_anchor_kernel(const QflArgs<scalar_t, acc_t, Target> args,
                                                                       const LossSink<acc_t> sink) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_classes = args.layout.num_classes;
  acc_t thread_sum = 0;
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
      if (sink.per_anchor != nullptr) {
        sink.per_anchor[anchor] = weight * loss;
      }
      thread_sum += weight * loss;
    }
  }
  if (sink.block_sums != nullptr) {
    block_sum_to(thread_sum, sink.block_sums + blockIdx.x);
  }
}

// A thread per anchor, walking its classes.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads) qfl_thread_per_anchor_kernel(const QflArgs<scalar_t, acc_t, Target> args,
                                                                         const LossSink<acc_t> sink) {
  acc_t thread_sum = 0;
  for (int64_t anchor = global_thread(); anchor < args.layout.num_anchors; anchor += grid_threads()) {
    const int64_t outer = anchor / args.layout.inner_size;
    const int64_t inner = anchor - outer * args.layout.inner_size;
    scalar_t* grad = Variant::kNeedGrad
                         ? args.grad + args.grad_strides.outer_offset(outer, args.layout) + inner * args.grad_strides.inner_stride
                         : nullptr;
    const acc_t loss = math::qfl_anchor<Variant>(
        args.pred + args.pred_strides.outer_offset(outer, args.layout) + inner * args.pred_strides.inner_stride,
        args.pred_strides.class_stride, grad, args.grad_strides.class_stride, args.target, anchor,
        args.target_strides.outer_offset(outer, args.layout) + inner * args.target_strides.inner_stride,
        args.target_strides.class_stride, args.layout.num_classes, args.beta, weight_at(args.weight, anchor));
    if (sink.per_anchor != nullptr) {
      sink.per_anchor[anchor] = loss;
    }
    thread_sum += loss;
  }
  if (sink.block_sums != nullptr) {
    block_sum_to(thread_sum, sink.block_sums + blockIdx.x);
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
        const int blocks = blocks_for(args.layout.num_anchors * kWarpSize);
        launch_loss_kernel(blocks, args.loss, total, stream, [&](const LossSink<acc_t>& sink) {
          qfl_warp_per_anchor_kernel<Variant><<<blocks, kThreads, 0, stream>>>(args, sink);
        });
      } else {
        const int blocks = blocks_for(args.layout.num_anchors);
        launch_loss_kernel(blocks, args.loss, total, stream, [&](const LossSink<acc_t>& sink) {
          qfl_thread_per_anchor_kernel<Variant><<<blocks, kThreads, 0, stream>>>(args, sink);
        });
      }
    });
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
                                                       const acc_t* weight, const LossSink<acc_t> sink) {
  acc_t thread_sum = 0;
  for (int64_t r = global_thread(); r < rows.num_rows; r += grid_threads()) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    const acc_t loss = math::dfl_row(rows.pred + r * rows.pred_row_stride, rows.pred_bin_stride, rows.num_bins,
                                     target[r], weight_at(weight, r), grad, rows.grad_bin_stride);
    if (sink.per_anchor != nullptr) {
      sink.per_anchor[r] = loss;
    }
    thread_sum += loss;
  }
  if (sink.block_sums != nullptr) {
    block_sum_to(thread_sum, sink.block_sums + blockIdx.x);
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
    const int blocks = blocks_for(rows.num_rows);
    launch_loss_kernel(blocks, loss, total, stream, [&](const LossSink<acc_t>& sink) {
      dfl_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(rows, target, weight, sink);
    });
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
