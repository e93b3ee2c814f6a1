// The anchor layout: how a strided (anchors x classes) tensor is described so that kernels
// read pred (and every tensor of its shape) in place, whatever its strides, and the typed
// arguments the kernels take (ClassArgs, BinRows). Shared by every device's kernels and by
// the Triton plans.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <vector>

#include "gfl_math.h"

namespace gfl {

// The anchor dimensions of pred: every dimension but the class dimension 1, coalesced
// where the memory layout allows. (N, C) row-major -> one dimension; (B, C, H, W)
// contiguous -> (B, H*W); channels-last (B, C, H, W) -> one dimension of stride C.
constexpr int kMaxAnchorDims = 8;

struct AnchorLayout {
  int64_t num_anchors = 0;
  int64_t num_classes = 0;
  int64_t inner_size = 1;  // anchors along the innermost dimension
  int num_outer_dims = 0;  // dimensions outside it, outermost first
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

// Where the tensors of a classification-loss kernel (QFL, focal, varifocal) live and how
// they are strided; passed by value to the CPU walks and to CUDA kernels alike.
template <typename scalar_t, typename acc_t, typename Target>
struct ClassArgs {
  const scalar_t* pred;
  scalar_t* grad;               // null when no gradient is wanted
  acc_t* loss;                  // one per anchor, contiguous; null for reduction "sum" (the launcher adds up)
                                // and for a loss per element
  const acc_t* weight;          // one per anchor, contiguous; null: every weight is 1
  const acc_t* class_weight;    // (C,), contiguous; null: every class weight is 1
  const acc_t* element_weight;  // pred's shape, through element_weight_strides; null: none
  acc_t* element_loss;          // the loss of each element, pred's shape; null: not asked for
  Target target;
  AnchorLayout layout;
  AnchorStrides pred_strides, grad_strides, target_strides, element_weight_strides, element_loss_strides;
  math::ModulationParams<acc_t> params;

  // Whether the kernel reads or writes tensors of pred's shape beyond pred, grad and target.
  bool element_io() const { return element_weight != nullptr || element_loss != nullptr; }
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
AnchorLayout make_anchor_layout(const std::vector<at::Tensor>& tensors, std::vector<AnchorStrides>& strides_out);

// The shape of pred without the class dimension: (N) for (N, C), (B, d1..dk) otherwise.
std::vector<int64_t> anchor_shape(const at::Tensor& pred);

// The tensors of a classification kernel that have pred's shape; undefined where absent.
struct ClassTensors {
  at::Tensor pred, grad, dense_target, element_weight, element_loss;
};

// Their coalesced layout, and each one's strides in it: [pred, grad, dense_target,
// element_weight, element_loss] (pred's strides where a tensor is absent, unused).
AnchorLayout class_layout(const ClassTensors& tensors, std::vector<AnchorStrides>& strides);

// Which walk suits the layout: classes contiguous in every tensor (rows), anchors
// contiguous in every tensor (channel-first planes), or neither (strided rows, which also
// take every element weight and loss per element).
enum class ClassWalk { kRows, kPlanes, kStridedRows };
ClassWalk choose_class_walk(const ClassTensors& tensors, const std::vector<AnchorStrides>& strides);

template <typename scalar_t>
BinRows<scalar_t> make_bin_rows(const at::Tensor& pred, at::Tensor& grad, bool compute_grad) {
  return {pred.const_data_ptr<scalar_t>(),
          pred.stride(0),
          pred.stride(1),
          compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          compute_grad ? grad.stride(0) : 0,
          compute_grad ? grad.stride(1) : 0,
          pred.size(0),
          pred.size(1)};
}

}  // namespace gfl
