// The _<operator>_plan operators: the native kernels' host code for the Triton kernels
// (gfl_ops/triton/ops.py), so that the argument checks, the outputs, the anchor layout and
// the modulation numbers exist once. A plan runs the operator's body (gfl_operators.h) with
// launchers that record what a kernel is launched with instead of launching one, and returns
// the outputs the kernel is to fill and that record, by name: (value, grad, layout, modulation).
//
//   layout, for QFL, focal and varifocal:
//       num_anchors, num_classes, inner_size  [one number each]
//       outer_sizes                           [one per outer dimension, outermost first]
//       pred, grad, target, element_weight, element_loss
//                                             [class stride, inner stride, outer strides...]
//                                             of each tensor of pred's shape (pred's strides
//                                             for one that is not there)
//   layout, for DFL and the integral:
//       num_rows, num_bins                    [one number each]
//       pred, grad                            [row stride, bin stride]
//   modulation (QFL, focal, varifocal; empty otherwise): gfl_math.h's ModulationParams by
//       member name, and `modulation`, the Modulation's number (0 QFL, 1 the focal family).
//
// Both are empty when there is nothing to launch (no anchors): the outputs are then complete,
// a sum of nothing being 0.
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "gfl_operators.h"

namespace gfl {
namespace {

using PlanLayout = c10::Dict<std::string, c10::List<int64_t>>;
using PlanModulation = c10::Dict<std::string, double>;
using PlanOutputs = std::tuple<at::Tensor, at::Tensor, PlanLayout, PlanModulation>;

struct Plan {
  PlanLayout layout;
  PlanModulation modulation;

  void record(const char* name, std::initializer_list<int64_t> numbers) {
    layout.insert(name, c10::List<int64_t>(numbers));
  }

  // A tensor of pred's shape in the classification layout: class, inner and outer strides.
  void record_strides(const char* name, const AnchorStrides& strides, const AnchorLayout& anchors) {
    c10::List<int64_t> numbers({strides.class_stride, strides.inner_stride});
    for (int d = 0; d < anchors.num_outer_dims; ++d) {
      numbers.push_back(strides.outer_strides[d]);
    }
    layout.insert(name, std::move(numbers));
  }

  template <typename acc_t>
  void record_modulation(math::Modulation kind, const math::ModulationParams<acc_t>& params) {
    modulation.insert("modulation", static_cast<double>(static_cast<int>(kind)));
    modulation.insert("exponent", params.exponent);
    modulation.insert("alpha_positive", params.alpha_positive);
    modulation.insert("alpha_negative", params.alpha_negative);
    modulation.insert("focal_base", params.focal_base);
    modulation.insert("weights_positives", params.weights_positives);
    modulation.insert("iou_weighted", params.iou_weighted);
    modulation.insert("detach_weight", params.detach_weight);
  }

  template <typename scalar_t>
  void record_bin_rows(const BinRows<scalar_t>& rows) {
    record("num_rows", {rows.num_rows});
    record("num_bins", {rows.num_bins});
    record("pred", {rows.pred_row_stride, rows.pred_bin_stride});
    record("grad", {rows.grad_row_stride, rows.grad_bin_stride});
  }
};

struct ClassRecorder {
  Plan* plan;

  template <math::Modulation kModulation, typename scalar_t, typename acc_t, typename Target>
  void operator()(std::integral_constant<math::Modulation, kModulation> /*modulation*/,
                  const ClassArgs<scalar_t, acc_t, Target>& args, bool /*activated*/, bool /*compute_grad*/,
                  ClassWalk /*walk*/, acc_t* /*total*/) const {
    const AnchorLayout& anchors = args.layout;
    plan->record("num_anchors", {anchors.num_anchors});
    plan->record("num_classes", {anchors.num_classes});
    plan->record("inner_size", {anchors.inner_size});
    c10::List<int64_t> outer_sizes;
    for (int d = 0; d < anchors.num_outer_dims; ++d) {
      outer_sizes.push_back(anchors.outer_sizes[d]);
    }
    plan->layout.insert("outer_sizes", std::move(outer_sizes));
    plan->record_strides("pred", args.pred_strides, anchors);
    plan->record_strides("grad", args.grad_strides, anchors);
    plan->record_strides("target", args.target_strides, anchors);
    plan->record_strides("element_weight", args.element_weight_strides, anchors);
    plan->record_strides("element_loss", args.element_loss_strides, anchors);
    plan->record_modulation(kModulation, args.params);
  }
};

struct DflRecorder {
  Plan* plan;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* /*target*/, const acc_t* /*weight*/, acc_t* /*loss*/,
                  acc_t* /*total*/) const {
    plan->record_bin_rows(rows);
  }
};

struct IntegralRecorder {
  Plan* plan;

  template <typename scalar_t, typename acc_t>
  void operator()(const BinRows<scalar_t>& rows, const acc_t* /*grad_scale*/, scalar_t* /*value*/) const {
    plan->record_bin_rows(rows);
  }
};

// The launchers of a plan: recorders into `plan`.
struct PlanRecorders {
  Plan* plan;

  ClassRecorder classification(const at::Tensor& /*pred*/) const { return {plan}; }
  DflRecorder dfl(const at::Tensor& /*pred*/) const { return {plan}; }
  IntegralRecorder integral(const at::Tensor& /*pred*/) const { return {plan}; }
};

// Op's _<operator>_plan: its body with the recorders; the kernel's arguments.
template <typename Op, typename Body = BodyOf<Op, PlanRecorders>>
struct PlanKernel;

template <typename Op, typename... Arguments>
struct PlanKernel<Op, KernelOutputs (*)(const PlanRecorders&, Arguments...)> {
  static PlanOutputs call(Arguments... arguments) {
    Plan plan;
    auto [value, grad] = Op::run(PlanRecorders{&plan}, arguments...);
    return {std::move(value), std::move(grad), std::move(plan.layout), std::move(plan.modulation)};
  }
};

template <typename... Operators>
void register_plans(torch::Library& m, OperatorList<Operators...> /*operators*/) {
  (m.impl(companion_name(Operators::kName, "plan").c_str(), &PlanKernel<Operators>::call), ...);
}

}  // namespace

// Device-generic: a plan only allocates (on pred's device) and reads sizes and strides.
TORCH_LIBRARY_IMPL(gfl_ops, CompositeExplicitAutograd, m) { register_plans(m, AllOperators{}); }

}  // namespace gfl
