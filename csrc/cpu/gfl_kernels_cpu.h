// Fused CPU kernels: one pass over pred computes the per-anchor loss and, when asked, the
// gradient of that loss. The maths is in ../gfl_math.h; this file only walks memory.
//
// Speed comes from three things: (1) each walk is compiled for AVX-512, AVX2 and baseline
// x86-64 (GCC target_clones picks one at load time), (2) the transcendental functions and
// the float16/bfloat16 conversions of gfl_math.h are branch-free, so whole class loops
// vectorise, (3) rows are spread over torch's intra-op thread pool. Reductions inside a row
// run in a fixed order for a given machine, and the sum of reduction "sum" in fixed chunks
// (parallel_walk), so results are the same bits run after run, whatever the number of
// threads.
//
// Included by the three translation units that register them (gfl_cpu_quality.cpp,
// gfl_cpu_focal_family.cpp, gfl_cpu_boxes.cpp: see register_native_kernels in gfl_operators.h);
// everything here is in an anonymous namespace, each unit instantiating what it registers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../gfl_math.h"
#include "../gfl_operators.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GFL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GFL_CPU_CLONES
#endif

namespace gfl {
namespace {

using math::LossAndGrad;

// Anchors (rows) per chunk of work: about 16k elements, a multiple of the walk's block.
int64_t chunk_for(int64_t elements_per_anchor, int64_t block) {
  const int64_t anchors = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elements_per_anchor));
  return (anchors + block - 1) / block * block;
}

// Runs walk(begin, end, loss) over the anchors [0, count) on torch's thread pool, in fixed
// chunks of `chunk` anchors; the walk writes the loss of anchor begin + i to loss[i].
// Reduction "none" (total null): loss points into the per-anchor output. Reduction "sum":
// loss is a buffer of one chunk, reused chunk after chunk, whose values are added up right
// after the walk wrote them (still in cache); then the chunks' sums in order, in double,
// into *total: the same bits whatever the number of threads, and no per-anchor vector.
template <typename acc_t, typename Walk>
void parallel_walk(int64_t count, int64_t chunk, acc_t* per_anchor, acc_t* total, const Walk& walk) {
  const int64_t num_chunks = (count + chunk - 1) / chunk;
  std::vector<double> chunk_sums(total != nullptr ? num_chunks : 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    std::vector<acc_t> chunk_losses(total != nullptr ? chunk : 0);
    for (int64_t c = first_chunk; c < last_chunk; ++c) {
      const int64_t begin = c * chunk;
      const int64_t end = std::min(count, begin + chunk);
      if (total == nullptr) {
        walk(begin, end, per_anchor == nullptr ? nullptr : per_anchor + begin);
        continue;
      }
      walk(begin, end, chunk_losses.data());
      double sum = 0;
      for (int64_t i = 0; i < end - begin; ++i) {
        sum += static_cast<double>(chunk_losses[i]);
      }
      chunk_sums[c] = sum;
    }
  });
  if (total != nullptr) {
    double sum = 0;
    for (const double chunk_sum : chunk_sums) {
      sum += chunk_sum;
    }
    *total = static_cast<acc_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// The classification losses: QFL, focal, varifocal
// ---------------------------------------------------------------------------------------

// Row walk: for each anchor, math::class_anchor over its classes (vectorised when classes
// are contiguous, kUnitClassStride). Used for (N, C) and channels-last layouts, and (strided)
// for every other layout and for element weights and losses. The walks cover anchors (outer,
// inner_begin..inner_end - 1) and write the loss of anchor (outer, j) to loss[j - inner_begin]
// unless loss is null.
template <bool kUnitClassStride, typename Variant, typename scalar_t, typename acc_t, typename Target>
GFL_CPU_CLONES void class_rows(const ClassArgs<scalar_t, acc_t, Target>& args, int64_t outer, int64_t inner_begin,
                               int64_t inner_end, acc_t* loss) {
  // Locals, so the compiler knows the gradient stores cannot change them.
  const Target target = args.target;
  const math::ModulationParams<acc_t> params = args.params;
  const AnchorLayout& layout = args.layout;
  const int64_t num_classes = layout.num_classes;
  // An element tensor's (start of anchor j, class stride); the stride a literal 1 where
  // classes are contiguous.
  const auto row_of = [&](const AnchorStrides& strides, int64_t j) {
    return std::pair<int64_t, int64_t>{strides.outer_offset(outer, layout) + j * strides.inner_stride,
                                       kUnitClassStride ? 1 : strides.class_stride};
  };
  for (int64_t j = inner_begin; j < inner_end; ++j) {
    const int64_t anchor = outer * layout.inner_size + j;
    const auto [pred_offset, pred_stride] = row_of(args.pred_strides, j);
    const auto [grad_offset, grad_stride] = row_of(args.grad_strides, j);
    const auto [target_offset, target_stride] = row_of(args.target_strides, j);
    math::AnchorRow<scalar_t, acc_t> row{args.pred + pred_offset,
                                         pred_stride,
                                         Variant::kNeedGrad ? args.grad + grad_offset : nullptr,
                                         grad_stride,
                                         target_offset,
                                         target_stride,
                                         args.class_weight};
    if constexpr (Variant::kElementIO) {
      const auto [weight_offset, weight_stride] = row_of(args.element_weight_strides, j);
      const auto [loss_offset, loss_stride] = row_of(args.element_loss_strides, j);
      row.element_weight = args.element_weight == nullptr ? nullptr : args.element_weight + weight_offset;
      row.element_weight_stride = weight_stride;
      row.element_loss = args.element_loss == nullptr ? nullptr : args.element_loss + loss_offset;
      row.element_loss_stride = loss_stride;
    }
    const acc_t anchor_loss =
        math::class_anchor<Variant>(row, target, anchor, num_classes, params, weight_at(args.weight, anchor));
    if (loss != nullptr) {
      loss[j - inner_begin] = anchor_loss;
    }
  }
}

// Plane walk for channel-first layouts ((B, C, H, W) read in place): anchors are contiguous
// within a class plane, so a block of anchors is processed class by class, vectorised
// across anchors, with the per-anchor sums kept in small local arrays (chunked over
// classes like math::class_anchor).
constexpr int64_t kPlaneBlock = 64;  // anchors per block of the plane walk

template <typename Variant, typename scalar_t, typename acc_t, typename Target>
GFL_CPU_CLONES void class_planes(const ClassArgs<scalar_t, acc_t, Target>& args, int64_t outer, int64_t inner_begin,
                                 int64_t inner_end, acc_t* loss) {
  constexpr int64_t kBlock = kPlaneBlock;
  const Target target = args.target;
  const math::ModulationParams<acc_t> params = args.params;
  const int64_t num_classes = args.layout.num_classes;
  const int64_t pred_base = args.pred_strides.outer_offset(outer, args.layout);
  const int64_t grad_base = args.grad_strides.outer_offset(outer, args.layout);
  const int64_t target_base = args.target_strides.outer_offset(outer, args.layout);
  for (int64_t block_begin = inner_begin; block_begin < inner_end; block_begin += kBlock) {
    const int64_t block_size = std::min(kBlock, inner_end - block_begin);
    const int64_t first_anchor = outer * args.layout.inner_size + block_begin;
    acc_t block_loss[kBlock] = {};
    acc_t block_weight[kBlock];
    for (int64_t j = 0; j < block_size; ++j) {
      block_weight[j] = weight_at(args.weight, first_anchor + j);
    }
    for (int64_t chunk_begin = 0; chunk_begin < num_classes; chunk_begin += math::kClassChunk) {
      const int64_t chunk_end = std::min(num_classes, chunk_begin + math::kClassChunk);
      acc_t chunk_loss[kBlock] = {};
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const scalar_t* pred_plane = args.pred + pred_base + c * args.pred_strides.class_stride + block_begin;
        scalar_t* grad_plane =
            Variant::kNeedGrad ? args.grad + grad_base + c * args.grad_strides.class_stride + block_begin : nullptr;
        const int64_t target_plane = target_base + c * args.target_strides.class_stride + block_begin;
        const acc_t class_weight = math::class_weight_at(args.class_weight, c);
#pragma omp simd
        for (int64_t j = 0; j < block_size; ++j) {
          const acc_t t = target.at(first_anchor + j, c, target_plane + j);
          const LossAndGrad<acc_t> element = math::class_element<Variant>(
              math::to_acc<acc_t>(pred_plane[j]), t, target.positive(first_anchor + j, c, t), params);
          chunk_loss[j] += class_weight * element.loss;
          if (Variant::kNeedGrad) {
            grad_plane[j] = math::from_acc<scalar_t>(block_weight[j] * class_weight * element.grad);
          }
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < block_size; ++j) {
        block_loss[j] += chunk_loss[j];
      }
    }
    if (loss != nullptr) {
      for (int64_t j = 0; j < block_size; ++j) {
        loss[block_begin - inner_begin + j] = block_weight[j] * block_loss[j];
      }
    }
  }
}

// Splits the anchors over the thread pool and hands each run of anchors that shares an
// outer index to the walk that suits the layout (element weights and losses: the strided
// rows, the only walk built with them).
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
void class_launch(const ClassArgs<scalar_t, acc_t, Target>& args, ClassWalk walk, acc_t* total) {
  const AnchorLayout& layout = args.layout;
  const int64_t chunk = chunk_for(layout.num_classes, kPlaneBlock);
  parallel_walk(layout.num_anchors, chunk, args.loss, total, [&](int64_t begin, int64_t end, acc_t* loss) {
    for (int64_t anchor = begin; anchor < end;) {
      const int64_t outer = anchor / layout.inner_size;
      const int64_t inner_begin = anchor % layout.inner_size;
      const int64_t inner_end = std::min(layout.inner_size, inner_begin + (end - anchor));
      acc_t* run_loss = loss == nullptr ? nullptr : loss + (anchor - begin);
      if constexpr (Variant::kElementIO) {
        class_rows<false, Variant>(args, outer, inner_begin, inner_end, run_loss);
      } else {
        switch (walk) {
          case ClassWalk::kRows:
            class_rows<true, Variant>(args, outer, inner_begin, inner_end, run_loss);
            break;
          case ClassWalk::kPlanes:
            class_planes<Variant>(args, outer, inner_begin, inner_end, run_loss);
            break;
          case ClassWalk::kStridedRows:
            class_rows<false, Variant>(args, outer, inner_begin, inner_end, run_loss);
            break;
        }
      }
      anchor += inner_end - inner_begin;
    }
  });
}

// ---------------------------------------------------------------------------------------
// Distribution Focal Loss and the integral: math::dfl_row / math::integral_row per row.
//
// Rows are short (8, 16 or 17 bins), so loop overhead dominates unless the compiler knows
// the row: kBins > 0 fixes the bin count at compile time (the loops become straight-line
// vector code), kBins == 0 reads it at run time. Both need contiguous bins (unit stride);
// other layouts take the general walk. Every walk covers rows row_begin..row_end - 1 and
// writes row r's loss (value) to loss[r - row_begin] (value[r - row_begin]).
// ---------------------------------------------------------------------------------------

// Bin counts that get their own walk: GFL/mmdetection (reg_max 16 -> 17), YOLOv8
// (reg_max 16 -> 16), NanoDet-Plus (reg_max 7 -> 8).
template <bool kUnitBinStride, int64_t kBins, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void dfl_rows(const BinRows<scalar_t>& rows, const acc_t* target, const acc_t* weight, acc_t* loss,
                             int64_t row_begin, int64_t row_end) {
  // Rows row_begin..row_end - 1; the loss of row r goes to loss[r - row_begin].
  const int64_t num_bins = kBins > 0 ? kBins : rows.num_bins;
  const int64_t pred_bin = kUnitBinStride ? 1 : rows.pred_bin_stride;
  const int64_t grad_bin = kUnitBinStride ? 1 : rows.grad_bin_stride;
  for (int64_t r = row_begin; r < row_end; ++r) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    loss[r - row_begin] = math::dfl_row(rows.pred + r * rows.pred_row_stride, pred_bin, num_bins, target[r],
                                        weight_at(weight, r), grad, grad_bin);
  }
}

// Block walks for rows of kBins contiguous bins: kRowBlock rows at a time, transposed into
// local arrays so that every step runs vectorised across rows (a row of 17 bins is too
// short to vectorise well on its own): math::dfl_row's and math::integral_row's steps, each
// taken across the block's rows, bin after bin.
constexpr int64_t kRowBlock = 16;

template <int64_t kBins, typename acc_t>
struct RowBlock {
  acc_t z[kBins][kRowBlock];        // logits, bin-major
  acc_t shifted[kBins][kRowBlock];  // exp(z - m); the walks overwrite it with the gradient
  acc_t row_max[kRowBlock];         // m
  acc_t sum_exp[kRowBlock];         // S = sum_k exp(z_k - m)

  // The rows' logits, transposed, and their m and S (math::row_softmax_stats).
  template <typename scalar_t>
  GFL_HOST_DEVICE void load(const BinRows<scalar_t>& rows, int64_t first_row) {
    const scalar_t* pred = rows.pred + first_row * rows.pred_row_stride;
    if constexpr (sizeof(scalar_t) < sizeof(acc_t)) {
      // x86 gathers 32- and 64-bit lanes only: 16-bit elements are gathered as they are
      // (plain copies), then widened across the block in vector code, 10% faster than
      // widening each as it is gathered.
      scalar_t narrow[kBins][kRowBlock];
      for (int64_t k = 0; k < kBins; ++k) {
        for (int64_t j = 0; j < kRowBlock; ++j) {
          std::memcpy(&narrow[k][j], &pred[j * rows.pred_row_stride + k], sizeof(scalar_t));
        }
      }
      for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
        for (int64_t j = 0; j < kRowBlock; ++j) {
          z[k][j] = math::to_acc<acc_t>(narrow[k][j]);
        }
      }
    } else {
      for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
        for (int64_t j = 0; j < kRowBlock; ++j) {
          z[k][j] = math::to_acc<acc_t>(pred[j * rows.pred_row_stride + k]);  // a gather
        }
      }
    }
    for (int64_t j = 0; j < kRowBlock; ++j) {
      row_max[j] = z[0][j];
      sum_exp[j] = 0;
    }
    for (int64_t k = 1; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        row_max[j] = math::max_step(row_max[j], z[k][j]);
      }
    }
    for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        shifted[k][j] = math::shifted_exp(z[k][j], row_max[j]);
        sum_exp[j] += shifted[k][j];
      }
    }
  }

  template <typename scalar_t>
  GFL_HOST_DEVICE void store_gradient(const BinRows<scalar_t>& rows, int64_t first_row) const {
    scalar_t* grad = rows.grad + first_row * rows.grad_row_stride;
    for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        grad[j * rows.grad_row_stride + k] = math::from_acc<scalar_t>(shifted[k][j]);  // a scatter
      }
    }
  }
};

template <int64_t kBins, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void dfl_row_blocks(const BinRows<scalar_t>& rows, const acc_t* target, const acc_t* weight, acc_t* loss,
                                   int64_t row_begin, int64_t row_end) {
  int64_t first_row = row_begin;
  for (; first_row + kRowBlock <= row_end; first_row += kRowBlock) {
    RowBlock<kBins, acc_t> block;
    block.load(rows, first_row);
    int64_t left[kRowBlock];
    acc_t weight_left[kRowBlock], weight_right[kRowBlock];
    scalar_t z_left[kRowBlock], z_right[kRowBlock];  // widened in the loss's vector loop
    for (int64_t j = 0; j < kRowBlock; ++j) {
      const math::DflBins<acc_t> bins = math::dfl_bins(target[first_row + j], kBins);
      left[j] = bins.left;
      weight_left[j] = bins.weight_left;
      weight_right[j] = bins.weight_right;
      // z_i and z_{i+1}: two scalar loads from pred (cheaper than picking them out of
      // the block lane by lane, and than reading back the block's fresh vector stores).
      const scalar_t* row = rows.pred + (first_row + j) * rows.pred_row_stride;
      z_left[j] = row[bins.left];
      z_right[j] = row[bins.left + 1];
    }
    acc_t row_weight[kRowBlock];
    for (int64_t j = 0; j < kRowBlock; ++j) {
      row_weight[j] = weight_at(weight, first_row + j);
    }
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      const math::DflBins<acc_t> bins{left[j], weight_left[j], weight_right[j]};
      loss[first_row - row_begin + j] =
          row_weight[j] * math::dfl_loss(block.row_max[j], block.sum_exp[j], math::to_acc<acc_t>(z_left[j]),
                                         math::to_acc<acc_t>(z_right[j]), bins);
    }
    if (rows.grad == nullptr) {
      continue;
    }
    acc_t inv_sum[kRowBlock];
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      inv_sum[j] = acc_t(1) / block.sum_exp[j];
    }
    for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        const math::DflBins<acc_t> bins{left[j], weight_left[j], weight_right[j]};
        block.shifted[k][j] = row_weight[j] * math::dfl_grad(block.shifted[k][j] * inv_sum[j], k, bins);
      }
    }
    block.store_gradient(rows, first_row);
  }
  dfl_rows<true, kBins>(rows, target, weight, loss + (first_row - row_begin), first_row, row_end);  // the last rows
}

template <bool kUnitBinStride, int64_t kBins, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void integral_rows(const BinRows<scalar_t>& rows, const acc_t* grad_scale, scalar_t* value,
                                  int64_t row_begin, int64_t row_end) {
  const int64_t num_bins = kBins > 0 ? kBins : rows.num_bins;
  const int64_t pred_bin = kUnitBinStride ? 1 : rows.pred_bin_stride;
  const int64_t grad_bin = kUnitBinStride ? 1 : rows.grad_bin_stride;
  for (int64_t r = row_begin; r < row_end; ++r) {
    scalar_t* grad = rows.grad == nullptr ? nullptr : rows.grad + r * rows.grad_row_stride;
    value[r - row_begin] = math::from_acc<scalar_t>(math::integral_row<acc_t>(
        rows.pred + r * rows.pred_row_stride, pred_bin, num_bins, weight_at(grad_scale, r), grad, grad_bin));
  }
}

template <int64_t kBins, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void integral_row_blocks(const BinRows<scalar_t>& rows, const acc_t* grad_scale, scalar_t* value,
                                        int64_t row_begin, int64_t row_end) {
  int64_t first_row = row_begin;
  for (; first_row + kRowBlock <= row_end; first_row += kRowBlock) {
    RowBlock<kBins, acc_t> block;
    block.load(rows, first_row);
    acc_t inv_sum[kRowBlock], expectation[kRowBlock];
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      inv_sum[j] = acc_t(1) / block.sum_exp[j];
      expectation[j] = 0;
    }
    for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        expectation[j] += math::weighted_term(block.shifted[k][j], k);  // E S
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kRowBlock; ++j) {
      expectation[j] *= inv_sum[j];
      value[first_row - row_begin + j] = math::from_acc<scalar_t>(expectation[j]);
    }
    if (rows.grad == nullptr) {
      continue;
    }
    acc_t row_scale[kRowBlock];
    for (int64_t j = 0; j < kRowBlock; ++j) {
      row_scale[j] = weight_at(grad_scale, first_row + j);
    }
    for (int64_t k = 0; k < kBins; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < kRowBlock; ++j) {
        block.shifted[k][j] = row_scale[j] * math::integral_grad(block.shifted[k][j] * inv_sum[j], k, expectation[j]);
      }
    }
    block.store_gradient(rows, first_row);
  }
  integral_rows<true, kBins, scalar_t, acc_t>(rows, grad_scale, value + (first_row - row_begin), first_row,
                                              row_end);  // the last rows
}

// A walk's two compile-time choices: contiguous bins, and the bin count (0: at run time).
template <bool kUnitBinStride_, int64_t kBins_>
struct BinWalk {
  static constexpr bool kUnitBinStride = kUnitBinStride_;
  static constexpr int64_t kBins = kBins_;
};

// Runs `walk(BinWalk<...>{}, begin, end, out)` over the rows in parallel, the walk chosen
// once; the walk writes row begin + i's value to out[i] (parallel_walk: per_row + begin,
// or a chunk buffer that is added up into *total).
template <typename scalar_t, typename out_t, typename Walk>
void launch_bin_rows(const BinRows<scalar_t>& rows, out_t* per_row, out_t* total, const Walk& walk) {
  const bool unit_bin_stride = rows.pred_bin_stride == 1 && (rows.grad == nullptr || rows.grad_bin_stride == 1);
  parallel_walk(rows.num_rows, chunk_for(rows.num_bins, kRowBlock), per_row, total,
                [&](int64_t begin, int64_t end, out_t* out) {
                  if (!unit_bin_stride) {
                    walk(BinWalk<false, 0>{}, begin, end, out);
                  } else if (rows.num_bins == 17) {
                    walk(BinWalk<true, 17>{}, begin, end, out);
                  } else if (rows.num_bins == 16) {
                    walk(BinWalk<true, 16>{}, begin, end, out);
                  } else if (rows.num_bins == 8) {
                    walk(BinWalk<true, 8>{}, begin, end, out);
                  } else {
                    walk(BinWalk<true, 0>{}, begin, end, out);
                  }
                });
}

// The launchers of the operator bodies (gfl_operators.h).
struct CpuClassLaunch {
  template <math::Modulation kModulation, typename scalar_t, typename acc_t, typename Target>
  void operator()(std::integral_constant<math::Modulation, kModulation> /*modulation*/,
                  const ClassArgs<scalar_t, acc_t, Target>& args, bool activated, bool compute_grad, ClassWalk walk,
                  acc_t* total) const {
    dispatch_class_variant<kModulation>(activated, args.params, compute_grad, args.element_io(),
                                        [&](auto variant) { class_launch<decltype(variant)>(args, walk, total); });
  }
};

struct CpuDflLaunch {
  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* target, const acc_t* weight, acc_t* loss,
                  acc_t* total) const {
    launch_bin_rows(rows, loss, total, [&](auto walk, int64_t begin, int64_t end, acc_t* out) {
      using W = decltype(walk);
      if constexpr (W::kBins > 0) {
        dfl_row_blocks<W::kBins, scalar_t, acc_t>(rows, target, weight, out, begin, end);
      } else {
        dfl_rows<W::kUnitBinStride, W::kBins, scalar_t, acc_t>(rows, target, weight, out, begin, end);
      }
    });
  }
};

struct CpuIntegralLaunch {
  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* grad_scale, scalar_t* value) const {
    scalar_t* const no_total = nullptr;  // the integral is not a loss: nothing to add up
    launch_bin_rows(rows, value, no_total, [&](auto walk, int64_t begin, int64_t end, scalar_t* out) {
      using W = decltype(walk);
      if constexpr (W::kBins > 0) {
        integral_row_blocks<W::kBins, scalar_t, acc_t>(rows, grad_scale, out, begin, end);
      } else {
        integral_rows<W::kUnitBinStride, W::kBins, scalar_t, acc_t>(rows, grad_scale, out, begin, end);
      }
    });
  }
};

// The CPU's launchers, for NativeKernel (gfl_operators.h).
struct CpuDevice {
  using Guard = NoDeviceGuard;
  static CpuClassLaunch classification(const at::Tensor& /*pred*/) { return {}; }
  static CpuDflLaunch dfl(const at::Tensor& /*pred*/) { return {}; }
  static CpuIntegralLaunch integral(const at::Tensor& /*pred*/) { return {}; }
};

}  // namespace
}  // namespace gfl
