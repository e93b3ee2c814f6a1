// The host checks that keep the kernels in bounds, whatever the inputs hold (the Python
// API gives friendlier errors first), and the allocation of the kernels' outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace gfl {

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

}  // namespace gfl
