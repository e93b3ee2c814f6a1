// CUDA kernels of the gfl_ops operators and their launchers: the walks of the CPU kernels
// mapped onto threads; the maths is the very same ../gfl_math.h. One pass over pred per
// call; no host sync; the caller's stream.
//
//   QFL, focal, varifocal, classes contiguous ((N, C), channels-last): a group of lanes per anchor (a power
//       of two, up to the warp, enough to cover the row in one step where C allows), each
//       lane reading 16-byte vectors of its anchor's row when every row is aligned to them;
//       the anchor's sum reduced by warp shuffles in a fixed tree (deterministic);
//   the same, anchors contiguous ((B, C, H, W) read in place), any other layout, or element
//       weights and losses: a thread per anchor walking its classes with math::class_anchor,
//       neighbouring threads reading neighbouring anchors of a class plane (coalesced);
//   DFL and the integral: a thread per row of n + 1 bins, math::dfl_row / integral_row.
//
// Reduction "sum" is taken inside the loss kernels (per-block sums, then one block adds
// them up: see launch_loss_kernel). All offsets are 64-bit; grids stride over the work,
// so any N x C fits.
//
// Two compilers build this header: nvcc (gfl_cuda_*.cu, which register the operators)
// and, on machines without a GPU, the host compiler under a CUDA emulator
// (tests/cuda/cuda_emulation/), which runs these very kernels on the CPU in CI. The includer
// provides cudaStream_t, the CUDA keywords and built-ins, and
//
//   launch_kernel(kernel, blocks, threads, stream, args...)
//
// which runs kernel<<<blocks, threads, 0, stream>>>(args...) and checks the launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "../gfl_math.h"
#include "../gfl_operators.h"

// A hook for the emulator, which checks every vector access's alignment; nothing on a GPU,
// where a misaligned vector access faults (the host checks below rule it out).
#ifndef GFL_ASSERT_ALIGNED
#define GFL_ASSERT_ALIGNED(pointer, bytes)
#endif

// The most blocks a grid gets; grid-stride loops cover the rest. 8192 blocks (2M threads,
// several waves on an H100's 132 SMs) fill any GPU, and keep the per-block sums of
// reduction "sum" few enough for one block to add them up (32 KB). To tune by measurement
// on a GPU. The emulated build lowers it so that its small tests wrap the grid.
#ifndef GFL_CUDA_MAX_BLOCKS
#define GFL_CUDA_MAX_BLOCKS 8192
#endif

namespace gfl {
namespace cuda {

using math::LossAndGrad;

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxBlocks = GFL_CUDA_MAX_BLOCKS;
// The widest load a thread issues: 16 bytes (4 floats, 8 halves, 2 doubles).
constexpr int kVectorBytes = 16;

inline int blocks_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The sum of `value` over each aligned group of `width` lanes (a power of two up to the
// warp), complete in the group's first lane: a fixed tree of shuffles. Every lane of the
// warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t lane_group_sum(acc_t value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset, width);
  }
  return value;
}

// kSize consecutive elements, loaded or stored as one access of kSize * sizeof(T) bytes.
template <typename T, int kSize>
struct alignas(sizeof(T) * kSize) Vector {
  T values[kSize];
};

template <int kSize, typename T>
__device__ __forceinline__ Vector<T, kSize> load_vector(const T* pointer) {
  GFL_ASSERT_ALIGNED(pointer, sizeof(Vector<T, kSize>));
  return *reinterpret_cast<const Vector<T, kSize>*>(pointer);
}

// A 16-byte vector is stored by one st.global.v4.b32 of its four 32-bit words. Assigned as
// a struct, nvcc split the store into kSize scalar STG.E in every rows kernel (the element
// values are computed one by one in the loop before it, and the loads stay LDG.E.128): the
// SASS check in tests/cuda/test_cuda_machine_code.py holds it to one STG.E.128. No "memory"
// clobber: a kernel never reads back what it stores.
template <int kSize, typename T>
__device__ __forceinline__ void store_vector(T* pointer, const Vector<T, kSize>& vector) {
  GFL_ASSERT_ALIGNED(pointer, sizeof(Vector<T, kSize>));
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(Vector<T, kSize>) == 16) {
    uint32_t words[4];
    memcpy(words, &vector, sizeof(words));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(pointer), "r"(words[0]), "r"(words[1]), "r"(words[2]),
                 "r"(words[3]));
    return;
  }
#endif
  *reinterpret_cast<Vector<T, kSize>*>(pointer) = vector;
}

// ---------------------------------------------------------------------------------------
// Reduction "sum", inside the loss kernels: each thread adds up the losses it computes, each
// block adds up its threads' sums (a fixed tree in shared memory) into one value per block,
// and the blocks' values are added up the same way, in one block. The grid's size depends
// only on the problem's size, so every sum is taken in the same order run after run: the
// same bits, no atomics, no host sync, and no per-anchor loss vector.
// ---------------------------------------------------------------------------------------

// *out = the sum of every thread's `value`, in a fixed order. Every thread of the block
// (kThreads of them) must call it.
template <typename acc_t>
__device__ __forceinline__ void block_sum_to(acc_t value, acc_t* out) {
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (unsigned stride = kThreads / 2; stride > 0; stride /= 2) {
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
// for reduction "sum", the blocks' sums (scratch allocated with `scratch_options`, pred's
// device) added up into *total.
template <typename acc_t, typename Kernel>
void launch_loss_kernel(int blocks, acc_t* per_anchor, acc_t* total, cudaStream_t stream,
                        const at::TensorOptions& scratch_options, const Kernel& kernel) {
  at::Tensor block_sums;
  if (total != nullptr) {
    block_sums = at::empty({blocks}, scratch_options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  kernel(LossSink<acc_t>{per_anchor, total != nullptr ? block_sums.mutable_data_ptr<acc_t>() : nullptr});
  if (total != nullptr) {
    launch_kernel(&sum_kernel<acc_t>, 1, kThreads, stream, block_sums.const_data_ptr<acc_t>(),
                  static_cast<int64_t>(blocks), total);
  }
}

// ---------------------------------------------------------------------------------------
// The classification losses: QFL, focal, varifocal
// ---------------------------------------------------------------------------------------

// The targets t of classes c .. c + kSize - 1 of one anchor, in the two target forms;
// `element` is the dense target's offset of class c. The label form reads per anchor, not
// per class: its accessor as it is.
template <int kSize, typename acc_t, bool kHasScores>
__device__ __forceinline__ void load_targets(const math::LabelTarget<acc_t, kHasScores>& target, int64_t anchor,
                                             int64_t c, int64_t element, acc_t (&t)[kSize]) {
  for (int j = 0; j < kSize; ++j) {
    t[j] = target.at(anchor, c + j, element + j);
  }
}

template <int kSize, typename target_t, typename acc_t>
__device__ __forceinline__ void load_targets(const math::DenseTarget<target_t, acc_t>& target, int64_t /*anchor*/,
                                             int64_t /*c*/, int64_t element, acc_t (&t)[kSize]) {
  const Vector<target_t, kSize> values = load_vector<kSize>(target.values + element);
  for (int j = 0; j < kSize; ++j) {
    t[j] = static_cast<acc_t>(values.values[j]);
  }
}

// Classes contiguous in pred, grad and a dense target: a group of `lanes_per_anchor` lanes
// per anchor, each lane taking kVector consecutive classes at a time (kVector = 1: scalar
// loads, for rows that are not aligned to vectors). Every lane of a warp runs the same
// number of loop iterations (the bound depends on the warp's first anchor only), so the
// shuffles always see the whole warp.
template <typename Variant, int kVector, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads) class_rows_kernel(const ClassArgs<scalar_t, acc_t, Target> args,
                                                              const int lanes_per_anchor, const LossSink<acc_t> sink) {
  const int lane = threadIdx.x % kWarpSize;
  const int lane_in_anchor = lane % lanes_per_anchor;
  const int anchors_per_warp = kWarpSize / lanes_per_anchor;
  const int64_t num_anchors = args.layout.num_anchors;
  const int64_t num_classes = args.layout.num_classes;
  const int64_t anchors_per_grid_step = grid_threads() / kWarpSize * anchors_per_warp;
  acc_t thread_sum = 0;
  for (int64_t warp_first_anchor = global_thread() / kWarpSize * anchors_per_warp; warp_first_anchor < num_anchors;
       warp_first_anchor += anchors_per_grid_step) {
    const int64_t anchor = warp_first_anchor + lane / lanes_per_anchor;
    const bool has_anchor = anchor < num_anchors;
    acc_t weight = 0;
    acc_t loss = 0;
    if (has_anchor) {
      const int64_t outer = anchor / args.layout.inner_size;
      const int64_t inner = anchor - outer * args.layout.inner_size;
      const scalar_t* pred =
          args.pred + args.pred_strides.outer_offset(outer, args.layout) + inner * args.pred_strides.inner_stride;
      scalar_t* grad = Variant::kNeedGrad ? args.grad + args.grad_strides.outer_offset(outer, args.layout) +
                                                inner * args.grad_strides.inner_stride
                                          : nullptr;
      const int64_t target_row =
          args.target_strides.outer_offset(outer, args.layout) + inner * args.target_strides.inner_stride;
      weight = weight_at(args.weight, anchor);
      for (int64_t c = static_cast<int64_t>(lane_in_anchor) * kVector; c < num_classes;
           c += static_cast<int64_t>(lanes_per_anchor) * kVector) {
        const Vector<scalar_t, kVector> x = load_vector<kVector>(pred + c);
        acc_t t[kVector];
        load_targets<kVector>(args.target, anchor, c, target_row + c, t);
        Vector<scalar_t, kVector> element_grads;
        for (int j = 0; j < kVector; ++j) {
          const LossAndGrad<acc_t> element = math::class_element<Variant>(
              static_cast<acc_t>(x.values[j]), t[j], args.target.positive(anchor, c + j, t[j]), args.params);
          const acc_t class_weight = math::class_weight_at(args.class_weight, c + j);
          loss += class_weight * element.loss;
          element_grads.values[j] = static_cast<scalar_t>(weight * class_weight * element.grad);
        }
        if (Variant::kNeedGrad) {
          store_vector<kVector>(grad + c, element_grads);
        }
      }
    }
    loss = lane_group_sum(loss, lanes_per_anchor);
    if (has_anchor && lane_in_anchor == 0) {
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

// The start of anchor (outer, inner) in a tensor of the anchor layout.
__device__ __forceinline__ int64_t anchor_start(const AnchorStrides& strides, const AnchorLayout& layout, int64_t outer,
                                                int64_t inner) {
  return strides.outer_offset(outer, layout) + inner * strides.inner_stride;
}

// A thread per anchor, walking its classes (and, for kElementIO, the element weights and
// losses).
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads)
    class_thread_per_anchor_kernel(const ClassArgs<scalar_t, acc_t, Target> args, const LossSink<acc_t> sink) {
  acc_t thread_sum = 0;
  for (int64_t anchor = global_thread(); anchor < args.layout.num_anchors; anchor += grid_threads()) {
    const int64_t outer = anchor / args.layout.inner_size;
    const int64_t inner = anchor - outer * args.layout.inner_size;
    const auto start = [&](const AnchorStrides& strides) { return anchor_start(strides, args.layout, outer, inner); };
    math::AnchorRow<scalar_t, acc_t> row{args.pred + start(args.pred_strides),
                                         args.pred_strides.class_stride,
                                         Variant::kNeedGrad ? args.grad + start(args.grad_strides) : nullptr,
                                         args.grad_strides.class_stride,
                                         start(args.target_strides),
                                         args.target_strides.class_stride,
                                         args.class_weight};
    if constexpr (Variant::kElementIO) {
      row.element_weight =
          args.element_weight == nullptr ? nullptr : args.element_weight + start(args.element_weight_strides);
      row.element_weight_stride = args.element_weight_strides.class_stride;
      row.element_loss = args.element_loss == nullptr ? nullptr : args.element_loss + start(args.element_loss_strides);
      row.element_loss_stride = args.element_loss_strides.class_stride;
    }
    const acc_t loss = math::class_anchor<Variant>(row, args.target, anchor, args.layout.num_classes, args.params,
                                                   weight_at(args.weight, anchor));
    if (sink.per_anchor != nullptr) {
      sink.per_anchor[anchor] = loss;
    }
    thread_sum += loss;
  }
  if (sink.block_sums != nullptr) {
    block_sum_to(thread_sum, sink.block_sums + blockIdx.x);
  }
}

// Whether every anchor's row of a tensor (its data and strides in the anchor layout)
// starts on a boundary of `vector_size` elements of `element_bytes` each: an aligned base,
// and offsets between rows that are multiples of the vector.
inline bool rows_start_aligned(const void* data, int64_t element_bytes, const AnchorStrides& strides,
                               const AnchorLayout& layout, int64_t vector_size) {
  if (reinterpret_cast<uintptr_t>(data) % (element_bytes * vector_size) != 0) {
    return false;
  }
  if (layout.inner_size > 1 && strides.inner_stride % vector_size != 0) {
    return false;
  }
  for (int d = 0; d < layout.num_outer_dims; ++d) {
    if (layout.outer_sizes[d] > 1 && strides.outer_strides[d] % vector_size != 0) {
      return false;
    }
  }
  return true;
}

template <typename acc_t, bool kHasScores>
bool target_rows_aligned(const math::LabelTarget<acc_t, kHasScores>& /*target*/, const AnchorStrides& /*strides*/,
                         const AnchorLayout& /*layout*/, int64_t /*vector_size*/) {
  return true;  // read per anchor, not per class
}

template <typename target_t, typename acc_t>
bool target_rows_aligned(const math::DenseTarget<target_t, acc_t>& target, const AnchorStrides& strides,
                         const AnchorLayout& layout, int64_t vector_size) {
  return rows_start_aligned(target.values, sizeof(target_t), strides, layout, vector_size);
}

// Whether the rows walk can read and write whole vectors of kVector classes: C a multiple
// of it, and every row of pred, grad and a dense target aligned to it.
template <int kVector, typename scalar_t, typename acc_t, typename Target>
bool rows_take_vectors(const ClassArgs<scalar_t, acc_t, Target>& args) {
  return args.layout.num_classes % kVector == 0 &&
         rows_start_aligned(args.pred, sizeof(scalar_t), args.pred_strides, args.layout, kVector) &&
         (args.grad == nullptr ||
          rows_start_aligned(args.grad, sizeof(scalar_t), args.grad_strides, args.layout, kVector)) &&
         target_rows_aligned(args.target, args.target_strides, args.layout, kVector);
}

// The lanes that share an anchor: enough to cover the row's vectors in one step, rounded
// up to a power of two, at most a warp (longer rows loop).
inline int lanes_per_anchor_for(int64_t num_classes, int vector_size) {
  const int64_t vectors_per_row = (num_classes + vector_size - 1) / vector_size;
  int lanes = 1;
  while (lanes < kWarpSize && lanes < vectors_per_row) {
    lanes *= 2;
  }
  return lanes;
}

struct ClassLaunch {
  cudaStream_t stream;
  at::TensorOptions scratch_options;

  template <math::Modulation kModulation, typename scalar_t, typename acc_t, typename Target>
  void operator()(std::integral_constant<math::Modulation, kModulation> /*modulation*/,
                  const ClassArgs<scalar_t, acc_t, Target>& args, bool activated, bool compute_grad, ClassWalk walk,
                  acc_t* total) const {
    constexpr int kVector = kVectorBytes / sizeof(scalar_t);
    dispatch_class_variant<kModulation>(activated, args.params, compute_grad, args.element_io(), [&](auto variant) {
      using Variant = decltype(variant);
      if (!Variant::kElementIO && walk == ClassWalk::kRows) {
        if (rows_take_vectors<kVector>(args)) {
          launch_rows<Variant, kVector>(args, total);
        } else {
          launch_rows<Variant, 1>(args, total);
        }
      } else {
        const int blocks = blocks_for(args.layout.num_anchors);
        launch_loss_kernel(blocks, args.loss, total, stream, scratch_options, [&](const LossSink<acc_t>& sink) {
          launch_kernel(&class_thread_per_anchor_kernel<Variant, scalar_t, acc_t, Target>, blocks, kThreads, stream,
                        args, sink);
        });
      }
    });
  }

  template <typename Variant, int kVector, typename scalar_t, typename acc_t, typename Target>
  void launch_rows(const ClassArgs<scalar_t, acc_t, Target>& args, acc_t* total) const {
    if constexpr (!Variant::kElementIO) {
      const int lanes_per_anchor = lanes_per_anchor_for(args.layout.num_classes, kVector);
      const int64_t anchors_per_warp = kWarpSize / lanes_per_anchor;
      const int64_t warps = (args.layout.num_anchors + anchors_per_warp - 1) / anchors_per_warp;
      const int blocks = blocks_for(warps * kWarpSize);
      launch_loss_kernel(blocks, args.loss, total, stream, scratch_options, [&](const LossSink<acc_t>& sink) {
        launch_kernel(&class_rows_kernel<Variant, kVector, scalar_t, acc_t, Target>, blocks, kThreads, stream, args,
                      lanes_per_anchor, sink);
      });
    }
  }
};

// ---------------------------------------------------------------------------------------
// Distribution Focal Loss and the integral: a thread per row.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dfl_kernel(const BinRows<scalar_t> rows, const acc_t* target, const acc_t* weight, const LossSink<acc_t> sink) {
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
__global__ void __launch_bounds__(kThreads)
    integral_kernel(const BinRows<scalar_t> rows, const acc_t* grad_scale, scalar_t* value) {
  for (int64_t r = global_thread(); r < rows.num_rows; r += grid_threads()) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    value[r] = static_cast<scalar_t>(math::integral_row<acc_t>(rows.pred + r * rows.pred_row_stride,
                                                               rows.pred_bin_stride, rows.num_bins,
                                                               weight_at(grad_scale, r), grad, rows.grad_bin_stride));
  }
}

struct DflLaunch {
  cudaStream_t stream;
  at::TensorOptions scratch_options;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* target, const acc_t* weight, acc_t* loss,
                  acc_t* total) const {
    const int blocks = blocks_for(rows.num_rows);
    launch_loss_kernel(blocks, loss, total, stream, scratch_options, [&](const LossSink<acc_t>& sink) {
      launch_kernel(&dfl_kernel<scalar_t, acc_t>, blocks, kThreads, stream, rows, target, weight, sink);
    });
  }
};

struct IntegralLaunch {
  cudaStream_t stream;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* grad_scale, scalar_t* value) const {
    launch_kernel(&integral_kernel<scalar_t, acc_t>, blocks_for(rows.num_rows), kThreads, stream, rows, grad_scale,
                  value);
  }
};

}  // namespace cuda
}  // namespace gfl
