// Host-side pieces shared by every device's implementation of the gfl_ops operators:
// input checks that keep the kernels in bounds, output allocation, and the description
// of a strided (anchors x classes) tensor that lets kernels read pred in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
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
  int64_t num_outer() const { return num_anchors / (inner_size > 0 ? inner_size : 1); }
};

// Element strides of one tensor shaped like pred, in the coalesced anchor layout.
struct AnchorStrides {
  int64_t class_stride = 0;
  int64_t inner_stride = 0;
  std::array<int64_t, kMaxAnchorDims> outer_strides{};

  // Element offset of the first anchor of outer index `outer` (row-major over outer dims).
  int64_t outer_offset(int64_t outer, const AnchorLayout& layout) const {
    int64_t offset = 0;
    for (int d = layout.num_outer_dims - 1; d >= 0; --d) {
      offset += (outer % layout.outer_sizes[d]) * outer_strides[d];
      outer /= layout.outer_sizes[d];
    }
    return offset;
  }
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

// Memory-safety checks of the operator inputs (the Python API gives friendlier errors first).
void check_qfl_inputs(const at::Tensor& pred, const at::Tensor& label, const at::Tensor& score,
                      double beta);
void check_qfl_dense_inputs(const at::Tensor& pred, const at::Tensor& target, double beta);
void check_bin_inputs(const at::Tensor& pred, const char* op_name);
void check_dfl_inputs(const at::Tensor& pred, const at::Tensor& target);

// The gradient buffer: pred's layout when pred is dense, contiguous otherwise; empty when
// the caller needs no gradient.
at::Tensor allocate_grad(const at::Tensor& pred, bool compute_grad);

}  // namespace gfl
