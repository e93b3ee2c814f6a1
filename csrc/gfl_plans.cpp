// The _<operator>_plan operators: the native kernels' host code for the Triton kernels
// (gfl_ops/triton/ops.py), so that the argument checks, the outputs and the anchor layout
// exist once. A plan runs the operator body of gfl_host.h with a launcher that records the
// numbers a kernel is launched with instead of launching one, and returns the outputs the
// kernel is to fill: (value, grad, numbers).
//
//   QFL, focal, varifocal:
//                   [num_anchors, num_classes, inner_size, num_outer_dims, outer_sizes...,
//                    then for pred, grad, a dense target, an element weight and the loss
//                    per element (pred's strides for each one that is not there):
//                    class_stride, inner_stride, outer_strides...]
//   DFL, integral:  [num_rows, num_bins, pred_row_stride, pred_bin_stride, grad_row_stride,
//                    grad_bin_stride]
// The numbers are empty when there is nothing to launch (no anchors): the outputs are then
// complete, a sum of nothing being 0.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "gfl_host.h"
#include "gfl_ops.h"

namespace gfl {
namespace {

using Plan = std::vector<int64_t>;

void record_strides(const AnchorStrides& strides, const AnchorLayout& layout, Plan& plan) {
  plan.push_back(strides.class_stride);
  plan.push_back(strides.inner_stride);
  plan.insert(plan.end(), strides.outer_strides.begin(), strides.outer_strides.begin() + layout.num_outer_dims);
}

template <typename scalar_t>
void record_bin_rows(const BinRows<scalar_t>& rows, Plan& plan) {
  plan = {rows.num_rows,        rows.num_bins,        rows.pred_row_stride,
          rows.pred_bin_stride, rows.grad_row_stride, rows.grad_bin_stride};
}

struct ClassPlan {
  Plan* plan;

  template <math::Modulation kModulation, typename scalar_t, typename acc_t, typename Target>
  void operator()(std::integral_constant<math::Modulation, kModulation> /*modulation*/,
                  const ClassArgs<scalar_t, acc_t, Target>& args, bool /*activated*/, bool /*compute_grad*/,
                  ClassWalk /*walk*/, acc_t* /*total*/) const {
    const AnchorLayout& layout = args.layout;
    *plan = {layout.num_anchors, layout.num_classes, layout.inner_size, layout.num_outer_dims};
    plan->insert(plan->end(), layout.outer_sizes.begin(), layout.outer_sizes.begin() + layout.num_outer_dims);
    for (const AnchorStrides* strides : {&args.pred_strides, &args.grad_strides, &args.target_strides,
                                         &args.element_weight_strides, &args.element_loss_strides}) {
      record_strides(*strides, layout, *plan);
    }
  }
};

struct DflPlan {
  Plan* plan;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* /*target*/, const acc_t* /*weight*/, acc_t* /*loss*/,
                  acc_t* /*total*/) const {
    record_bin_rows(rows, *plan);
  }
};

struct IntegralPlan {
  Plan* plan;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* /*grad_scale*/, scalar_t* /*value*/) const {
    record_bin_rows(rows, *plan);
  }
};

template <typename Outputs>
std::tuple<at::Tensor, at::Tensor, Plan> with_plan(Outputs&& outputs, Plan&& plan) {
  return {std::get<0>(outputs), std::get<1>(outputs), std::move(plan)};
}

std::tuple<at::Tensor, at::Tensor, Plan> quality_focal_loss_plan(const at::Tensor& pred, const at::Tensor& label,
                                                                 const at::Tensor& score,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& class_weight,
                                                                 double beta, bool activated,
                                                                 c10::string_view reduction, bool compute_grad) {
  Plan plan;
  return with_plan(quality_focal_loss_impl(pred, label, score, weight, class_weight, beta, activated, reduction,
                                           compute_grad, ClassPlan{&plan}),
                   std::move(plan));
}

std::tuple<at::Tensor, at::Tensor, Plan> quality_focal_loss_dense_plan(const at::Tensor& pred, const at::Tensor& target,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       const std::optional<at::Tensor>& class_weight,
                                                                       double beta, bool activated,
                                                                       c10::string_view reduction, bool compute_grad) {
  Plan plan;
  return with_plan(quality_focal_loss_dense_impl(pred, target, weight, class_weight, beta, activated, reduction,
                                                 compute_grad, ClassPlan{&plan}),
                   std::move(plan));
}

std::tuple<at::Tensor, at::Tensor, Plan> sigmoid_focal_loss_plan(const at::Tensor& pred, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& class_weight,
                                                                 double alpha, double gamma, bool activated,
                                                                 c10::string_view reduction, bool compute_grad) {
  Plan plan;
  return with_plan(sigmoid_focal_loss_impl(pred, target, weight, class_weight, alpha, gamma, activated, reduction,
                                           compute_grad, ClassPlan{&plan}),
                   std::move(plan));
}

std::tuple<at::Tensor, at::Tensor, Plan> varifocal_loss_plan(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& score,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& class_weight, double alpha, double gamma,
    bool iou_weighted, bool detach_weight, bool activated, c10::string_view reduction, bool compute_grad) {
  Plan plan;
  return with_plan(varifocal_loss_impl(pred, target, score, weight, class_weight, alpha, gamma, iou_weighted,
                                       detach_weight, activated, reduction, compute_grad, ClassPlan{&plan}),
                   std::move(plan));
}

std::tuple<at::Tensor, at::Tensor, Plan> distribution_focal_loss_plan(const at::Tensor& pred, const at::Tensor& target,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      c10::string_view reduction, bool compute_grad) {
  Plan plan;
  return with_plan(distribution_focal_loss_impl(pred, target, weight, reduction, compute_grad, DflPlan{&plan}),
                   std::move(plan));
}

std::tuple<at::Tensor, at::Tensor, Plan> distribution_integral_plan(const at::Tensor& pred,
                                                                    const std::optional<at::Tensor>& grad_scale,
                                                                    bool compute_grad) {
  Plan plan;
  return with_plan(distribution_integral_impl(pred, grad_scale, compute_grad, IntegralPlan{&plan}), std::move(plan));
}

}  // namespace

// Device-generic: a plan only allocates (on pred's device) and reads sizes and strides.
TORCH_LIBRARY_IMPL(gfl_ops, CompositeExplicitAutograd, m) {
  m.impl("_quality_focal_loss_plan", &quality_focal_loss_plan);
  m.impl("_quality_focal_loss_dense_plan", &quality_focal_loss_dense_plan);
  m.impl("_sigmoid_focal_loss_plan", &sigmoid_focal_loss_plan);
  m.impl("_varifocal_loss_plan", &varifocal_loss_plan);
  m.impl("_distribution_focal_loss_plan", &distribution_focal_loss_plan);
  m.impl("_distribution_integral_plan", &distribution_integral_plan);
}

}  // namespace gfl
