// The host checks of the operators' inputs (gfl_checks.h), and their outputs' allocation.
#include "gfl_checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "gfl_anchor_layout.h"

namespace gfl {

at::ScalarType accumulate_dtype(at::ScalarType pred_dtype) {
  return pred_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

void check_float_pred(const at::Tensor& pred, const char* op_name) {
  TORCH_CHECK(pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kDouble ||
                  pred.scalar_type() == at::kHalf || pred.scalar_type() == at::kBFloat16,
              op_name, ": pred must be float32, float64, float16 or bfloat16, got ", pred.scalar_type());
}

// The kernels compute in float32 for every pred but float64: the exponent must fit.
void check_exponent(double exponent, const char* exponent_name, const char* op_name) {
  TORCH_CHECK(std::isfinite(exponent) && exponent >= 0.0 && exponent <= std::numeric_limits<float>::max(), op_name,
              ": ", exponent_name, " must be finite, >= 0 and at most float32's largest value, got ", exponent);
}

void check_same_device(const at::Tensor& pred, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == pred.device(), name, " is on ", other.device(), " but pred is on ", pred.device());
}

}  // namespace

LossReduction parse_reduction(c10::string_view reduction, const char* op_name) {
  if (reduction == "none") {
    return LossReduction::kNone;
  }
  TORCH_CHECK_VALUE(reduction == "sum", op_name, ": reduction must be \"none\" or \"sum\" (the mean is ",
                    "the sum divided by the anchor count or avg_factor), got \"", std::string(reduction), "\"");
  return LossReduction::kSum;
}

void check_class_inputs(const at::Tensor& pred, double exponent, const char* exponent_name, const char* op_name) {
  check_float_pred(pred, op_name);
  TORCH_CHECK(pred.dim() >= 2, op_name, ": pred must be (N, C) or (B, C, d1, ..., dk), got ", pred.dim(),
              " dimension(s)");
  TORCH_CHECK(pred.size(1) > 0, op_name, ": pred has no classes (C = 0)");
  check_exponent(exponent, exponent_name, op_name);
}

void check_label_target(const at::Tensor& pred, const at::Tensor& label, const std::optional<at::Tensor>& score,
                        const char* op_name) {
  check_same_device(pred, label, "label");
  const std::vector<int64_t> shape = anchor_shape(pred);
  TORCH_CHECK(label.sizes() == at::IntArrayRef(shape), op_name, ": label must have shape ", at::IntArrayRef(shape),
              " (pred without its class dimension), got ", label.sizes());
  TORCH_CHECK(label.scalar_type() == at::kLong, op_name, ": label must be int64, got ", label.scalar_type());
  if (!score.has_value()) {
    return;
  }
  check_same_device(pred, *score, "score");
  TORCH_CHECK(score->sizes() == at::IntArrayRef(shape), op_name, ": score must have shape ", at::IntArrayRef(shape),
              ", got ", score->sizes());
  TORCH_CHECK(score->scalar_type() == accumulate_dtype(pred.scalar_type()), op_name, ": score must be ",
              accumulate_dtype(pred.scalar_type()), " for ", pred.scalar_type(), " pred, got ", score->scalar_type());
}

void check_dense_target(const at::Tensor& pred, const at::Tensor& target, const char* op_name) {
  check_same_device(pred, target, "target");
  TORCH_CHECK(target.sizes() == pred.sizes(), op_name, ": target must have pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  // A half pred also takes its computation dtype, float32 (AMP's targets); float32 and
  // float64 pred take their own dtype alone, said once.
  const auto computation_dtype = accumulate_dtype(pred.scalar_type());
  const std::string accepted =
      pred.scalar_type() == computation_dtype
          ? std::string(c10::toString(computation_dtype))
          : std::string(c10::toString(pred.scalar_type())) + " or " + c10::toString(computation_dtype);
  TORCH_CHECK(target.scalar_type() == pred.scalar_type() || target.scalar_type() == computation_dtype, op_name,
              ": target must have pred's dtype (", accepted, "), got ", target.scalar_type());
}

void check_class_weight(const at::Tensor& pred, const std::optional<at::Tensor>& class_weight, const char* op_name) {
  if (!class_weight.has_value()) {
    return;
  }
  check_same_device(pred, *class_weight, "class_weight");
  TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == pred.size(1), op_name,
              ": class_weight must have shape (", pred.size(1), "), one weight per class, got ", class_weight->sizes());
  TORCH_CHECK(class_weight->scalar_type() == accumulate_dtype(pred.scalar_type()), op_name, ": class_weight must be ",
              accumulate_dtype(pred.scalar_type()), " for ", pred.scalar_type(), " pred, got ",
              class_weight->scalar_type());
}

void check_bin_inputs(const at::Tensor& pred, const char* op_name) {
  check_float_pred(pred, op_name);
  TORCH_CHECK(pred.dim() == 2, op_name, ": pred must be (M, n + 1), got ", pred.dim(), " dimension(s)");
  TORCH_CHECK(pred.size(1) >= 2, op_name, ": pred needs at least 2 bins, got ", pred.size(1));
}

void check_dfl_inputs(const at::Tensor& pred, const at::Tensor& target) {
  check_bin_inputs(pred, "distribution_focal_loss");
  check_same_device(pred, target, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == pred.size(0), "distribution_focal_loss: target must have shape (",
              pred.size(0), "), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == accumulate_dtype(pred.scalar_type()), "distribution_focal_loss: target must be ",
              accumulate_dtype(pred.scalar_type()), " for ", pred.scalar_type(), " pred, got ", target.scalar_type());
}

void check_weight(const at::Tensor& pred, const std::optional<at::Tensor>& weight, at::IntArrayRef shape,
                  const char* op_name) {
  if (!weight.has_value()) {
    return;
  }
  check_same_device(pred, *weight, "weight");
  TORCH_CHECK(weight->sizes() == at::IntArrayRef(shape), op_name, ": weight must have the loss's shape ", shape,
              ", got ", weight->sizes());
  TORCH_CHECK(weight->scalar_type() == accumulate_dtype(pred.scalar_type()), op_name, ": weight must be ",
              accumulate_dtype(pred.scalar_type()), " for ", pred.scalar_type(), " pred, got ", weight->scalar_type());
}

std::optional<at::Tensor> contiguous_weight(const std::optional<at::Tensor>& weight) {
  return weight.has_value() ? std::optional<at::Tensor>(weight->contiguous()) : std::nullopt;
}

at::Tensor allocate_grad(const at::Tensor& pred, bool compute_grad) {
  if (!compute_grad) {
    return at::empty({0}, pred.options());
  }
  return at::empty_like(pred);  // keeps pred's strides when pred is non-overlapping and dense
}

at::TensorOptions loss_options(const at::Tensor& pred) {
  return pred.options().dtype(accumulate_dtype(pred.scalar_type()));
}

}  // namespace gfl
