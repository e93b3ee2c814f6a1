// Fused CPU kernels: one pass over pred computes the per-anchor loss and, when asked, the
// gradient of that loss. The maths is in ../gfl_math.h; this file only walks memory.
//
// Speed comes from three things: (1) each kernel is compiled for AVX-512, AVX2 and baseline
// x86-64 (GCC target_clones picks one at load time), (2) the transcendental functions of
// gfl_math.h are branch-free, so whole class loops vectorise, (3) rows are spread over
// torch's intra-op thread pool. Reductions inside a row run in a fixed order for a given
// machine, so results are the same bits run after run.
#include "../gfl_math.h"
#include "../gfl_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GFL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GFL_CPU_CLONES
#endif

namespace gfl {
namespace {

using math::LossAndGrad;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Sums over classes are taken in chunks of this many classes, then the chunk sums are
// added: the rounding error of a per-anchor loss grows with C / kClassChunk + kClassChunk
// rather than with C (C = 1203 for LVIS), whether or not a loop vectorises.
constexpr int64_t kClassChunk = 32;

// Anchors per task of the thread pool: about 16k elements each.
int64_t grain_for(int64_t elements_per_anchor) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elements_per_anchor));
}

// ---------------------------------------------------------------------------------------
// Quality Focal Loss.
//
// The QFL target of an element comes either from the anchor's (label, score), or from a
// dense target tensor laid out like pred. Both are read through the same interface.
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct LabelScoreTarget {
  const int64_t* labels;  // one per anchor, contiguous
  const acc_t* scores;    // one per anchor, contiguous
  GFL_HOST_DEVICE acc_t at(int64_t anchor, int64_t class_index, int64_t /*element*/) const {
    return math::qfl_label_target(class_index, labels[anchor], scores[anchor]);
  }
};

template <typename scalar_t, typename acc_t>
struct DenseTarget {
  const scalar_t* values;  // laid out like pred; element offsets come from its own strides
  GFL_HOST_DEVICE acc_t at(int64_t /*anchor*/, int64_t /*class*/, int64_t element) const {
    return static_cast<acc_t>(values[element]);
  }
};

// Flags of one QFL instantiation.
template <bool kActivated_, bool kBetaIsTwo_, bool kNeedGrad_>
struct QflVariant {
  static constexpr bool kActivated = kActivated_;
  static constexpr bool kBetaIsTwo = kBetaIsTwo_;
  static constexpr bool kNeedGrad = kNeedGrad_;
};

// Where the three tensors of a QFL kernel live, and how they are strided.
template <typename scalar_t, typename acc_t, typename Target>
struct QflArgs {
  const scalar_t* pred;
  scalar_t* grad;
  acc_t* loss;  // one per anchor, contiguous
  Target target;
  AnchorLayout layout;
  AnchorStrides pred_strides, grad_strides, target_strides;
  acc_t beta;
};

// Row walk: for each anchor, a loop over its classes (vectorised when classes are
// contiguous, kUnitClassStride). Used for (N, C) and channels-last layouts.
template <bool kUnitClassStride, typename Variant, typename scalar_t, typename acc_t, typename Target>
GFL_CPU_CLONES void qfl_rows(const QflArgs<scalar_t, acc_t, Target>& args, int64_t outer,
                             int64_t inner_begin, int64_t inner_end) {
  // Locals, so the compiler knows the gradient stores cannot change them.
  const Target target = args.target;
  const acc_t beta = args.beta;
  const int64_t num_classes = args.layout.num_classes;
  const int64_t pred_class = kUnitClassStride ? 1 : args.pred_strides.class_stride;
  const int64_t grad_class = kUnitClassStride ? 1 : args.grad_strides.class_stride;
  const int64_t target_class = kUnitClassStride ? 1 : args.target_strides.class_stride;
  const int64_t pred_base = args.pred_strides.outer_offset(outer, args.layout);
  const int64_t grad_base = args.grad_strides.outer_offset(outer, args.layout);
  const int64_t target_base = args.target_strides.outer_offset(outer, args.layout);
  for (int64_t j = inner_begin; j < inner_end; ++j) {
    const int64_t anchor = outer * args.layout.inner_size + j;
    const scalar_t* pred_row = args.pred + pred_base + j * args.pred_strides.inner_stride;
    scalar_t* grad_row = args.grad + grad_base + j * args.grad_strides.inner_stride;
    const int64_t target_row = target_base + j * args.target_strides.inner_stride;
    acc_t row_loss = 0;
    for (int64_t chunk_begin = 0; chunk_begin < num_classes; chunk_begin += kClassChunk) {
      const int64_t chunk_end = std::min(num_classes, chunk_begin + kClassChunk);
      acc_t chunk_loss = 0;
#pragma omp simd reduction(+ : chunk_loss)
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const acc_t y = target.at(anchor, c, target_row + c * target_class);
        const LossAndGrad<acc_t> element =
            math::qfl_element<Variant::kActivated, Variant::kBetaIsTwo, Variant::kNeedGrad>(
                static_cast<acc_t>(pred_row[c * pred_class]), y, beta);
        chunk_loss += element.loss;
        if (Variant::kNeedGrad) {
          grad_row[c * grad_class] = static_cast<scalar_t>(element.grad);
        }
      }
      row_loss += chunk_loss;
    }
    args.loss[anchor] = row_loss;
  }
}

// Plane walk for channel-first layouts ((B, C, H, W) read in place): anchors are contiguous
// within a class plane, so a block of anchors is processed class by class, vectorised
// across anchors, with the per-anchor sums kept in a small local array.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
GFL_CPU_CLONES void qfl_planes(const QflArgs<scalar_t, acc_t, Target>& args, int64_t outer,
                               int64_t inner_begin, int64_t inner_end) {
  constexpr int64_t kBlock = 64;
  const Target target = args.target;
  const acc_t beta = args.beta;
  const int64_t num_classes = args.layout.num_classes;
  const int64_t pred_base = args.pred_strides.outer_offset(outer, args.layout);
  const int64_t grad_base = args.grad_strides.outer_offset(outer, args.layout);
  const int64_t target_base = args.target_strides.outer_offset(outer, args.layout);
  for (int64_t block_begin = inner_begin; block_begin < inner_end; block_begin += kBlock) {
    const int64_t block_size = std::min(kBlock, inner_end - block_begin);
    const int64_t first_anchor = outer * args.layout.inner_size + block_begin;
    acc_t block_loss[kBlock] = {};
    for (int64_t chunk_begin = 0; chunk_begin < num_classes; chunk_begin += kClassChunk) {
      const int64_t chunk_end = std::min(num_classes, chunk_begin + kClassChunk);
      acc_t chunk_loss[kBlock] = {};
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const scalar_t* pred_plane = args.pred + pred_base + c * args.pred_strides.class_stride + block_begin;
        scalar_t* grad_plane = args.grad + grad_base + c * args.grad_strides.class_stride + block_begin;
        const int64_t target_plane = target_base + c * args.target_strides.class_stride + block_begin;
#pragma omp simd
        for (int64_t j = 0; j < block_size; ++j) {
          const acc_t y = target.at(first_anchor + j, c, target_plane + j);
          const LossAndGrad<acc_t> element =
              math::qfl_element<Variant::kActivated, Variant::kBetaIsTwo, Variant::kNeedGrad>(
                  static_cast<acc_t>(pred_plane[j]), y, beta);
          chunk_loss[j] += element.loss;
          if (Variant::kNeedGrad) {
            grad_plane[j] = static_cast<scalar_t>(element.grad);
          }
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < block_size; ++j) {
        block_loss[j] += chunk_loss[j];
      }
    }
    std::copy(block_loss, block_loss + block_size, args.loss + first_anchor);
  }
}

// Splits the anchors over the thread pool and hands each run of anchors that shares an
// outer index to the walk that suits the layout.
template <typename Variant, typename scalar_t, typename acc_t, typename Target>
void qfl_launch(const QflArgs<scalar_t, acc_t, Target>& args, bool target_is_dense) {
  const AnchorLayout& layout = args.layout;
  const bool unit_class_stride = args.pred_strides.class_stride == 1 &&
                                 (!Variant::kNeedGrad || args.grad_strides.class_stride == 1) &&
                                 (!target_is_dense || args.target_strides.class_stride == 1);
  const bool unit_inner_stride = args.pred_strides.inner_stride == 1 &&
                                 (!Variant::kNeedGrad || args.grad_strides.inner_stride == 1) &&
                                 (!target_is_dense || args.target_strides.inner_stride == 1);
  at::parallel_for(0, layout.num_anchors, grain_for(layout.num_classes), [&](int64_t begin, int64_t end) {
    for (int64_t anchor = begin; anchor < end;) {
      const int64_t outer = anchor / layout.inner_size;
      const int64_t inner_begin = anchor % layout.inner_size;
      const int64_t inner_end = std::min(layout.inner_size, inner_begin + (end - anchor));
      if (unit_class_stride) {
        qfl_rows<true, Variant>(args, outer, inner_begin, inner_end);
      } else if (unit_inner_stride) {
        qfl_planes<Variant>(args, outer, inner_begin, inner_end);
      } else {
        qfl_rows<false, Variant>(args, outer, inner_begin, inner_end);
      }
      anchor += inner_end - inner_begin;
    }
  });
}

// Turns the runtime flags into template parameters, so each inner loop is branch-free.
template <typename scalar_t, typename acc_t, typename Target>
void qfl_dispatch_variant(const QflArgs<scalar_t, acc_t, Target>& args, bool activated,
                          bool compute_grad, bool target_is_dense) {
  const bool beta_is_two = args.beta == acc_t(2);
  auto launch = [&](auto variant) { qfl_launch<decltype(variant)>(args, target_is_dense); };
  if (activated) {
    if (beta_is_two) {
      compute_grad ? launch(QflVariant<true, true, true>{}) : launch(QflVariant<true, true, false>{});
    } else {
      compute_grad ? launch(QflVariant<true, false, true>{}) : launch(QflVariant<true, false, false>{});
    }
  } else {
    if (beta_is_two) {
      compute_grad ? launch(QflVariant<false, true, true>{}) : launch(QflVariant<false, true, false>{});
    } else {
      compute_grad ? launch(QflVariant<false, false, true>{}) : launch(QflVariant<false, false, false>{});
    }
  }
}

std::tuple<at::Tensor, at::Tensor> qfl_outputs(const at::Tensor& pred, bool compute_grad) {
  at::Tensor loss = at::empty(anchor_shape(pred), pred.options().dtype(accumulate_dtype(pred.scalar_type())));
  return {loss, allocate_grad(pred, compute_grad)};
}

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_cpu(const at::Tensor& pred, const at::Tensor& label,
                                                          const at::Tensor& score, double beta,
                                                          bool activated, bool compute_grad) {
  check_qfl_inputs(pred, label, score, beta);
  auto [loss, grad] = qfl_outputs(pred, compute_grad);
  if (loss.numel() == 0) {
    return {loss, grad};
  }
  const at::Tensor labels = label.contiguous();
  const at::Tensor scores = score.contiguous();
  std::vector<AnchorStrides> strides;
  const AnchorLayout layout = make_anchor_layout({pred, compute_grad ? grad : pred}, strides);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "quality_focal_loss_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    QflArgs<scalar_t, acc_t, LabelScoreTarget<acc_t>> args{
        pred.const_data_ptr<scalar_t>(),
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
        loss.mutable_data_ptr<acc_t>(),
        {labels.const_data_ptr<int64_t>(), scores.const_data_ptr<acc_t>()},
        layout, strides[0], strides[1], AnchorStrides{}, static_cast<acc_t>(beta)};
    qfl_dispatch_variant(args, activated, compute_grad, /*target_is_dense=*/false);
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> quality_focal_loss_dense_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                                double beta, bool activated, bool compute_grad) {
  check_qfl_dense_inputs(pred, target, beta);
  auto [loss, grad] = qfl_outputs(pred, compute_grad);
  if (loss.numel() == 0) {
    return {loss, grad};
  }
  std::vector<AnchorStrides> strides;
  const AnchorLayout layout = make_anchor_layout({pred, compute_grad ? grad : pred, target}, strides);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "quality_focal_loss_dense_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    QflArgs<scalar_t, acc_t, DenseTarget<scalar_t, acc_t>> args{
        pred.const_data_ptr<scalar_t>(),
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
        loss.mutable_data_ptr<acc_t>(),
        {target.const_data_ptr<scalar_t>()},
        layout, strides[0], strides[1], strides[2], static_cast<acc_t>(beta)};
    qfl_dispatch_variant(args, activated, compute_grad, /*target_is_dense=*/true);
  });
  return {loss, grad};
}

// ---------------------------------------------------------------------------------------
// Distribution Focal Loss and the integral: one row of n + 1 bins at a time.
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
struct BinRows {
  const scalar_t* pred;
  int64_t pred_row_stride, pred_bin_stride;
  scalar_t* grad;  // null when no gradient is wanted
  int64_t grad_row_stride, grad_bin_stride;
  int64_t num_bins;
};

// The row's maximum and sum_k exp(z_k - max): the two halves of its log-sum-exp. A NaN
// logit need not win the maximum: exp(NaN - max) makes the sum, and so the row, NaN.
template <typename acc_t, typename scalar_t>
GFL_HOST_DEVICE void row_softmax_stats(const scalar_t* row, int64_t bin_stride, int64_t num_bins,
                                       acc_t& row_max, acc_t& sum_exp) {
  row_max = static_cast<acc_t>(row[0]);
#pragma omp simd reduction(max : row_max)
  for (int64_t k = 1; k < num_bins; ++k) {
    const acc_t z = static_cast<acc_t>(row[k * bin_stride]);
    row_max = z > row_max ? z : row_max;
  }
  sum_exp = 0;
#pragma omp simd reduction(+ : sum_exp)
  for (int64_t k = 0; k < num_bins; ++k) {
    sum_exp += math::exp_(static_cast<acc_t>(row[k * bin_stride]) - row_max);
  }
}

// kUnitBinStride: bins are contiguous in pred and grad (the usual (M, n + 1) layout), so
// the bin loops vectorise with plain loads instead of gathers.
template <bool kUnitBinStride, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void dfl_rows(const BinRows<scalar_t>& rows, const acc_t* target, acc_t* loss,
                             int64_t row_begin, int64_t row_end) {
  const int64_t pred_bin = kUnitBinStride ? 1 : rows.pred_bin_stride;
  const int64_t grad_bin = kUnitBinStride ? 1 : rows.grad_bin_stride;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* z = rows.pred + r * rows.pred_row_stride;
    acc_t row_max, sum_exp;
    row_softmax_stats(z, pred_bin, rows.num_bins, row_max, sum_exp);
    const math::DflBins<acc_t> bins = math::dfl_bins(target[r], rows.num_bins);
    loss[r] = math::dfl_loss(math::log_sum_exp(row_max, sum_exp),
                             static_cast<acc_t>(z[bins.left * pred_bin]),
                             static_cast<acc_t>(z[(bins.left + 1) * pred_bin]), bins);
    if (rows.grad != nullptr) {
      scalar_t* g = rows.grad + r * rows.grad_row_stride;
      const acc_t inv_sum = acc_t(1) / sum_exp;
#pragma omp simd
      for (int64_t k = 0; k < rows.num_bins; ++k) {
        const acc_t softmax_k = math::exp_(static_cast<acc_t>(z[k * pred_bin]) - row_max) * inv_sum;
        g[k * grad_bin] = static_cast<scalar_t>(math::dfl_grad(softmax_k, k, bins));
      }
    }
  }
}

template <bool kUnitBinStride, typename scalar_t, typename acc_t>
GFL_CPU_CLONES void integral_rows(const BinRows<scalar_t>& rows, scalar_t* value, int64_t row_begin,
                                  int64_t row_end) {
  const int64_t pred_bin = kUnitBinStride ? 1 : rows.pred_bin_stride;
  const int64_t grad_bin = kUnitBinStride ? 1 : rows.grad_bin_stride;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* z = rows.pred + r * rows.pred_row_stride;
    acc_t row_max, sum_exp;
    row_softmax_stats(z, pred_bin, rows.num_bins, row_max, sum_exp);
    const acc_t inv_sum = acc_t(1) / sum_exp;
    acc_t expectation = 0;  // E = sum_k softmax_k * k
#pragma omp simd reduction(+ : expectation)
    for (int64_t k = 0; k < rows.num_bins; ++k) {
      expectation += math::exp_(static_cast<acc_t>(z[k * pred_bin]) - row_max) * static_cast<acc_t>(k);
    }
    expectation *= inv_sum;
    value[r] = static_cast<scalar_t>(expectation);
    if (rows.grad != nullptr) {
      scalar_t* g = rows.grad + r * rows.grad_row_stride;
#pragma omp simd
      for (int64_t k = 0; k < rows.num_bins; ++k) {
        const acc_t softmax_k = math::exp_(static_cast<acc_t>(z[k * pred_bin]) - row_max) * inv_sum;
        g[k * grad_bin] = static_cast<scalar_t>(math::integral_grad(softmax_k, k, expectation));
      }
    }
  }
}

// Runs `walk<kUnitBinStride>` over the rows in parallel, with the stride flag resolved once.
template <typename scalar_t, typename Walk>
void launch_bin_rows(const BinRows<scalar_t>& rows, int64_t num_rows, const Walk& walk) {
  const bool unit_bin_stride = rows.pred_bin_stride == 1 && (rows.grad == nullptr || rows.grad_bin_stride == 1);
  at::parallel_for(0, num_rows, grain_for(rows.num_bins), [&](int64_t begin, int64_t end) {
    if (unit_bin_stride) {
      walk(std::true_type{}, begin, end);
    } else {
      walk(std::false_type{}, begin, end);
    }
  });
}

template <typename scalar_t>
BinRows<scalar_t> bin_rows(const at::Tensor& pred, at::Tensor& grad, bool compute_grad) {
  return {pred.const_data_ptr<scalar_t>(), pred.stride(0), pred.stride(1),
          compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          compute_grad ? grad.stride(0) : 0, compute_grad ? grad.stride(1) : 0, pred.size(1)};
}

std::tuple<at::Tensor, at::Tensor> distribution_focal_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                               bool compute_grad) {
  check_dfl_inputs(pred, target);
  at::Tensor loss = at::empty({pred.size(0)}, target.options());
  at::Tensor grad = allocate_grad(pred, compute_grad);
  const at::Tensor targets = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "distribution_focal_loss_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const BinRows<scalar_t> rows = bin_rows<scalar_t>(pred, grad, compute_grad);
    const acc_t* target_ptr = targets.const_data_ptr<acc_t>();
    acc_t* loss_ptr = loss.mutable_data_ptr<acc_t>();
    launch_bin_rows(rows, pred.size(0), [&](auto unit_bin_stride, int64_t begin, int64_t end) {
      dfl_rows<decltype(unit_bin_stride)::value, scalar_t, acc_t>(rows, target_ptr, loss_ptr, begin, end);
    });
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> distribution_integral_cpu(const at::Tensor& pred, bool compute_grad) {
  check_bin_inputs(pred, "distribution_integral");
  at::Tensor value = at::empty({pred.size(0)}, pred.options());
  at::Tensor grad = allocate_grad(pred, compute_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "distribution_integral_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const BinRows<scalar_t> rows = bin_rows<scalar_t>(pred, grad, compute_grad);
    scalar_t* value_ptr = value.mutable_data_ptr<scalar_t>();
    launch_bin_rows(rows, pred.size(0), [&](auto unit_bin_stride, int64_t begin, int64_t end) {
      integral_rows<decltype(unit_bin_stride)::value, scalar_t, acc_t>(rows, value_ptr, begin, end);
    });
  });
  return {value, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfl_ops, CPU, m) {
  m.impl("quality_focal_loss", &quality_focal_loss_cpu);
  m.impl("quality_focal_loss_dense", &quality_focal_loss_dense_cpu);
  m.impl("distribution_focal_loss", &distribution_focal_loss_cpu);
  m.impl("distribution_integral", &distribution_integral_cpu);
}

}  // namespace gfl
