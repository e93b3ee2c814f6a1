// Host-side pieces shared by every device's implementation of the gfl_ops operators:
// input checks that keep the kernels in bounds, output allocation, and the description
// of a strided (anchors x classes) tensor that lets kernels read pred in place.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
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

// Float32 for half and bfloat16 inputs, float64 for float64: the loss dtype and the type
// scores and targets are read in.
at::ScalarType accumulate_dtype(at::ScalarType pred_dtype);

// What an operator returns as its loss: the per-anchor (per-row) values, or their sum as a
// 0-dim tensor, added up in a fixed order (the same bits run after run, whatever the
// number of threads). The schema's `str reduction`: "none" or "sum".
enum class LossReduction { kNone, kSum };
LossReduction parse_reduction(c10::string_view reduction, const char* op_name);

// Memory-safety checks of the operator inputs (the Python API gives friendlier errors first).
// A classification loss's pred, its exponent (beta or gamma, named `exponent_name`) and its
// target: (label, score) of the anchor shape, or dense of pred's shape; and its class_weight.
void check_class_inputs(const at::Tensor& pred, double exponent, const char* exponent_name, const char* op_name);
void check_label_target(const at::Tensor& pred, const at::Tensor& label, const std::optional<at::Tensor>& score,
                        const char* op_name);
void check_dense_target(const at::Tensor& pred, const at::Tensor& target, const char* op_name);
void check_class_weight(const at::Tensor& pred, const std::optional<at::Tensor>& class_weight, const char* op_name);
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

// The options of a loss: float32 for half pred (float64 for float64), pred's device.
at::TensorOptions loss_options(const at::Tensor& pred);

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

// Whether an exponent's closed form is built for an input kind and element I/O (else: pow). Each instantiation is a set
// of CPU walks compiled three times (target_clones) and of CUDA kernels, so the closed forms are built where they are
// used: all of them on logits (beta = 0: YOLOv8's soft-target BCE; gamma = 1.5: DEIM), 2 for probabilities and for the
// focal family's element weights and losses of pred's shape (rare layouts of the work).
template <bool kActivated, bool kElementIO>
constexpr bool exponent_is_built(math::Exponent kind) {
  return kind == math::Exponent::kTwo || kind == math::Exponent::kGeneral || (!kActivated && !kElementIO);
}

// Calls f(math::ClassVariant<modulation, exponent kind, activated, compute_grad, kElementIO>{}):
// the runtime exponent and compute_grad to template ones.
template <math::Modulation kModulation, bool kActivated, bool kElementIO, typename F>
void dispatch_exponent(math::Exponent kind, bool compute_grad, const F& f) {
  using math::Exponent;
  const auto with_outputs = [&](auto exponent) {
    constexpr Exponent kExponent = decltype(exponent)::value;
    if constexpr (exponent_is_built<kActivated, kElementIO>(kExponent)) {
      compute_grad ? f(math::ClassVariant<kModulation, kExponent, kActivated, true, kElementIO>{})
                   : f(math::ClassVariant<kModulation, kExponent, kActivated, false, kElementIO>{});
    }
  };
  switch (exponent_is_built<kActivated, kElementIO>(kind) ? kind : Exponent::kGeneral) {
    case Exponent::kZero:
      return with_outputs(std::integral_constant<Exponent, Exponent::kZero>{});
    case Exponent::kOne:
      return with_outputs(std::integral_constant<Exponent, Exponent::kOne>{});
    case Exponent::kOneAndHalf:
      return with_outputs(std::integral_constant<Exponent, Exponent::kOneAndHalf>{});
    case Exponent::kTwo:
      return with_outputs(std::integral_constant<Exponent, Exponent::kTwo>{});
    case Exponent::kGeneral:
      return with_outputs(std::integral_constant<Exponent, Exponent::kGeneral>{});
  }
}

// Element I/O (a weight or loss of pred's shape) to a template flag: the focal family's only.
template <math::Modulation kModulation, bool kActivated, typename F>
void dispatch_element_io(math::Exponent kind, bool compute_grad, bool element_io, const F& f) {
  if constexpr (kModulation == math::Modulation::kFocalFamily) {
    if (element_io) {
      return dispatch_exponent<kModulation, kActivated, true>(kind, compute_grad, f);
    }
  }
  dispatch_exponent<kModulation, kActivated, false>(kind, compute_grad, f);
}

// What the launchers call: f(math::ClassVariant<...>{}) of a call's activated, exponent,
// compute_grad and element I/O.
template <math::Modulation kModulation, typename acc_t, typename F>
void dispatch_class_variant(bool activated, const math::ModulationParams<acc_t>& params, bool compute_grad,
                            bool element_io, const F& f) {
  const math::Exponent kind = math::exponent_kind(static_cast<double>(params.exponent));
  if (activated) {
    dispatch_element_io<kModulation, true>(kind, compute_grad, element_io, f);
  } else {
    dispatch_element_io<kModulation, false>(kind, compute_grad, element_io, f);
  }
}

}  // namespace gfl
