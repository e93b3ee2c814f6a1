// Host-side pieces shared by every device's implementation of the gfl_ops operators:
// input checks that keep the kernels in bounds, output allocation, and the description
// of a strided (anchors x classes) tensor that lets kernels read pred in place.
#pragma once

#include "gfl_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace gfl {

// The anchor dimensions of pred: every dimension but the class dimension 1, coalesced
// where the memory layout allows. (N, C) row-major -> one dimension; (B, C, H, W)
// contiguous -> (B, H*W); channels-last (B, C, H, W) -> one dimension of stride C.
constexpr int kMaxAnchorDims = 8;

struct AnchorLayout {
  int64_t num_anchors = 0;
  int64_t num_classes = 0;
  int64_t inner_size = 1;                              // anchors along the innermost dimension
  int num_outer_dims = 0;                              // dimensions outside it, outermost first
  std::array<int64_t, kMaxAnchorDims> outer_sizes{};
};

// Element strides of one tensor shaped like pred, in the coalesced anchor layout.
struct AnchorStrides {
  int64_t class_stride = 0;
  int64_t inner_stride = 0;
  std::array<int64_t, kMaxAnchorDims> outer_strides{};

  // Element offset of the first anchor of outer index `outer` (row-major over outer dims).
  GFL_HOST_DEVICE int64_t outer_offset(int64_t outer, const AnchorLayout& layout) const {
    int64_t offset = 0;
    for (int d = layout.num_outer_dims - 1; d >= 0; --d) {
      offset += (outer % layout.outer_sizes[d]) * outer_strides[d];
      outer /= layout.outer_sizes[d];
    }
    return offset;
  }
};

// Where the tensors of a QFL kernel live and how they are strided; passed by value to the
// CPU walks and to CUDA kernels alike.
template <typename scalar_t, typename acc_t, typename Target>
struct QflArgs {
  const scalar_t* pred;
  scalar_t* grad;  // null when no gradient is wanted
  acc_t* loss;     // one per anchor, contiguous; null for reduction "sum" (the launcher adds up)
  const acc_t* weight;  // one per anchor, contiguous; null: every weight is 1
  Target target;
  AnchorLayout layout;
  AnchorStrides pred_strides, grad_strides, target_strides;
  acc_t beta;
};

// The weight of anchor (row) i: weights[i], or 1 without weights.
template <typename acc_t>
GFL_HOST_DEVICE acc_t weight_at(const acc_t* weights, int64_t i) {
  return weights == nullptr ? acc_t(1) : weights[i];
}

// Rows of n + 1 bins (DFL, integral): pred and its gradient, each with two strides.
template <typename scalar_t>
struct BinRows {
  const scalar_t* pred;
  int64_t pred_row_stride, pred_bin_stride;
  scalar_t* grad;  // null when no gradient is wanted
  int64_t grad_row_stride, grad_bin_stride;
  int64_t num_rows, num_bins;
};

// Coalesces the anchor dimensions of tensors that all have pred's shape. Dimensions merge
// only where they merge in every tensor, so one loop walks all of them together.
AnchorLayout make_anchor_layout(const std::vector<at::Tensor>& tensors,
                                std::vector<AnchorStrides>& strides_out);

// The shape of pred without the class dimension: (N) for (N, C), (B, d1..dk) otherwise.
std::vector<int64_t> anchor_shape(const at::Tensor& pred);

// Float32 for half and bfloat16 inputs, float64 for float64: the loss dtype and the type
// scores and targets are read in.
at::ScalarType accumulate_dtype(at::ScalarType pred_dtype);

// What an operator returns as its loss: the per-anchor (per-row) values, or their sum as a
// 0-dim tensor, added up in a fixed order (the same bits run after run, whatever the
// number of threads). The schema's `str reduction`: "none" or "sum".
enum class LossReduction { kNone, kSum };
LossReduction parse_reduction(c10::string_view reduction, const char* op_name);

// Memory-safety checks of the operator inputs (the Python API gives friendlier errors first).
void check_qfl_inputs(const at::Tensor& pred, const at::Tensor& label, const at::Tensor& score,
                      double beta);
void check_qfl_dense_inputs(const at::Tensor& pred, const at::Tensor& target, double beta);
void check_bin_inputs(const at::Tensor& pred, const char* op_name);
void check_dfl_inputs(const at::Tensor& pred, const at::Tensor& target);
// An optional per-anchor (per-row) weight: the loss's shape, its dtype, pred's device.
void check_weight(const at::Tensor& pred, const std::optional<at::Tensor>& weight, at::IntArrayRef shape,
                  const char* op_name);

// The weight's data (contiguous), or null when there is none.
template <typename acc_t>
const acc_t* weight_data(const std::optional<at::Tensor>& contiguous_weight) {
  return contiguous_weight.has_value() ? contiguous_weight->const_data_ptr<acc_t>() : nullptr;
}
std::optional<at::Tensor> contiguous_weight(const std::optional<at::Tensor>& weight);

// The gradient buffer: pred's layout when pred is dense, contiguous otherwise; empty when
// the caller needs no gradient.
at::Tensor allocate_grad(const at::Tensor& pred, bool compute_grad);

// The options of QFL's loss: float32 for half pred (float64 for float64), pred's device.
at::TensorOptions qfl_loss_options(const at::Tensor& pred);

// The layout of pred, the gradient (when computed) and a dense target (when given), and
// each one's strides in it: [pred, grad, target].
AnchorLayout qfl_layout(const at::Tensor& pred, const at::Tensor& grad, bool compute_grad,
                        const at::Tensor* dense_target, std::vector<AnchorStrides>& strides);

// Which walk suits the layout: classes contiguous in every tensor (rows), anchors
// contiguous in every tensor (channel-first planes), or neither (strided rows).
enum class QflWalk { kRows, kPlanes, kStridedRows };
QflWalk choose_qfl_walk(const std::vector<AnchorStrides>& strides, bool need_grad, bool dense_target);

template <typename scalar_t>
BinRows<scalar_t> make_bin_rows(const at::Tensor& pred, at::Tensor& grad, bool compute_grad) {
  return {pred.const_data_ptr<scalar_t>(), pred.stride(0), pred.stride(1),
          compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          compute_grad ? grad.stride(0) : 0, compute_grad ? grad.stride(1) : 0, pred.size(0), pred.size(1)};
}

// Calls f(QflVariant<activated, beta == 2, compute_grad>{}): runtime flags to template ones.
template <typename F>
void dispatch_qfl_variant(bool activated, bool beta_is_two, bool compute_grad, const F& f) {
  if (activated) {
    if (beta_is_two) {
      compute_grad ? f(math::QflVariant<true, true, true>{}) : f(math::QflVariant<true, true, false>{});
    } else {
      compute_grad ? f(math::QflVariant<true, false, true>{}) : f(math::QflVariant<true, false, false>{});
    }
  } else {
    if (beta_is_two) {
      compute_grad ? f(math::QflVariant<false, true, true>{}) : f(math::QflVariant<false, true, false>{});
    } else {
      compute_grad ? f(math::QflVariant<false, false, true>{}) : f(math::QflVariant<false, false, false>{});
    }
  }
}

}  // namespace gfl
