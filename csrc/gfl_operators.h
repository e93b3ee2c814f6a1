// The operators of gfl_ops, each declared once: its name, its schemas, and its body, the host
// code every backend shares. A body checks the inputs, allocates the outputs, describes the
// memory layout and hands typed kernel arguments to a launcher, the only part that differs
// between backends: a device's kernels (CPU, CUDA), or the plan a Triton kernel is launched
// from (gfl_triton_plans.cpp). The bodies take their launchers from `launchers`, an object
// with three methods that each return one for pred:
//
//   launchers.classification(pred) (QFL, focal, varifocal):
//                      launch(modulation tag, const ClassArgs<scalar_t, acc_t, Target>&, activated, compute_grad,
//                             ClassWalk, acc_t* total)
//   launchers.dfl(pred):
//                      launch(const BinRows<scalar_t>&, const acc_t* target, const acc_t* weight, acc_t* loss,
//                             acc_t* total)
//   launchers.integral(pred):
//                      launch(const BinRows<scalar_t>&, const acc_t* grad_scale, scalar_t* value)
//
// The loss launchers write one loss per anchor (row) into the loss buffer (reduction "none"),
// the loss of each element into ClassArgs::element_loss (reduction "none" of focal and
// varifocal), or, when `total` is not null (reduction "sum", the loss buffer then null), the sum of
// those losses into *total (device memory), added up in a fixed order. The integral's
// launcher scales row r's gradient by grad_scale[r] (1 when grad_scale is null).
//
// The kernel signature of an operator is its public signature less `backend`, plus
// `bool compute_grad` last (and the integral's `Tensor? grad_scale`), and returns
// (value, d value / d pred): gfl_registration.cpp checks this contract when it defines them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gfl_anchor_layout.h"
#include "gfl_checks.h"
#include "gfl_math.h"

// The namespace the operators are registered in: gfl_ops, or the tests' second build of them
// (gfl_ops_cuda_emulated). TORCH_LIBRARY pastes its namespace argument into names: the
// GFL_TORCH_LIBRARY* forms expand GFL_OPS_NAMESPACE first.
#ifndef GFL_OPS_NAMESPACE
#define GFL_OPS_NAMESPACE gfl_ops
#endif
#define GFL_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GFL_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define GFL_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace gfl {

// ---------------------------------------------------------------------------------------
// Kernel variants: which compiled variant of the classification kernels a call takes.
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// The operator bodies' parts
// ---------------------------------------------------------------------------------------

// The operator's loss output: the per-anchor (per-row) losses or, for the elementwise losses
// (focal, varifocal), the loss of each element, laid out like pred (reduction "none"); or
// their 0-dim sum (reduction "sum"), for which nothing per anchor is allocated: the
// launchers add up as they go (their loss pointers are then null).
struct LossOutputs {
  at::Tensor per_anchor;   // reduction "none" of a per-anchor loss
  at::Tensor per_element;  // reduction "none" of an elementwise loss
  at::Tensor total;        // reduction "sum"

  LossOutputs(at::IntArrayRef anchor_shape, const at::TensorOptions& options, LossReduction reduction) {
    if (reduction == LossReduction::kSum) {
      total = at::empty({}, options);  // the launcher writes it (no fill kernel on CUDA)
    } else {
      per_anchor = at::empty(anchor_shape, options);
    }
  }

  // An elementwise loss of pred: its "none" has pred's shape and layout, in `options`' dtype.
  LossOutputs(const at::Tensor& pred, const at::TensorOptions& options, LossReduction reduction) {
    if (reduction == LossReduction::kSum) {
      total = at::empty({}, options);
    } else {
      per_element = at::empty_like(pred, options);  // keeps pred's strides when pred is dense
    }
  }

  // The result when there are no anchors: no launcher runs, and a sum of nothing is 0.
  const at::Tensor& result_of_no_anchors() const {
    if (total.defined()) {
      total.zero_();
    }
    return result();
  }

  template <typename acc_t>
  acc_t* per_anchor_data() const {
    return per_anchor.defined() ? per_anchor.mutable_data_ptr<acc_t>() : nullptr;
  }

  template <typename acc_t>
  acc_t* per_element_data() const {
    return per_element.defined() ? per_element.mutable_data_ptr<acc_t>() : nullptr;
  }

  template <typename acc_t>
  acc_t* total_data() const {
    return total.defined() ? total.mutable_data_ptr<acc_t>() : nullptr;
  }

  const at::Tensor& result() const {
    return total.defined() ? total : (per_element.defined() ? per_element : per_anchor);
  }
};

// A classification loss's target: (label, score) of the anchor shape, labels alone (focal:
// score undefined, a score of 1), or a dense tensor of pred's shape (then label and score
// are undefined).
struct ClassTarget {
  at::Tensor label, score, dense;
};

// The parts of a classification loss call that every form and loss shares.
struct ClassCall {
  const char* op_name;
  const std::optional<at::Tensor>& weight;        // the anchor shape, or pred's (elementwise losses)
  const std::optional<at::Tensor>& class_weight;  // (C,)
  double exponent;                                // beta or gamma
  const char* exponent_name;
  bool activated;
  c10::string_view reduction;
  bool elementwise;  // reduction "none" is a loss per element (focal, varifocal), not per anchor
  bool compute_grad;
};

// The weight of pred's shape, a weight of each element, when `weight` is one.
inline bool is_element_weight(const at::Tensor& pred, const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->dim() == pred.dim();
}

// Checks, outputs, layout, then the launch of the classification kernel of kModulation:
// launch(tag, const ClassArgs<scalar_t, acc_t, Target>&, activated, compute_grad, ClassWalk,
// acc_t* total), with tag a std::integral_constant of the modulation.
template <math::Modulation kModulation, typename Launch>
std::tuple<at::Tensor, at::Tensor> class_loss_impl(const at::Tensor& pred, const ClassTarget& target,
                                                   const ClassCall& call, const math::ModulationParams<double>& params,
                                                   const Launch& launch) {
  check_class_inputs(pred, call.exponent, call.exponent_name, call.op_name);
  const bool dense = target.dense.defined();
  if (dense) {
    check_dense_target(pred, target.dense, call.op_name);
  } else {
    check_label_target(pred, target.label, target.score.defined() ? target.score : std::optional<at::Tensor>(),
                       call.op_name);
  }
  const bool element_weight = call.elementwise && is_element_weight(pred, call.weight);
  check_weight(pred, call.weight, element_weight ? pred.sizes() : at::IntArrayRef(anchor_shape(pred)), call.op_name);
  check_class_weight(pred, call.class_weight, call.op_name);
  const LossReduction reduction = parse_reduction(call.reduction, call.op_name);
  const LossOutputs outputs = call.elementwise ? LossOutputs(pred, loss_options(pred), reduction)
                                               : LossOutputs(anchor_shape(pred), loss_options(pred), reduction);
  at::Tensor grad = allocate_grad(pred, call.compute_grad);
  if (pred.numel() == 0) {
    return {outputs.result_of_no_anchors(), grad};
  }
  const at::Tensor labels = dense ? at::Tensor() : target.label.contiguous();
  const at::Tensor scores = target.score.defined() ? target.score.contiguous() : at::Tensor();
  const std::optional<at::Tensor> anchor_weights = element_weight ? std::nullopt : contiguous_weight(call.weight);
  const std::optional<at::Tensor> class_weights = contiguous_weight(call.class_weight);
  const ClassTensors tensors{pred, call.compute_grad ? grad : at::Tensor(), target.dense,
                             element_weight ? *call.weight : at::Tensor(), outputs.per_element};
  std::vector<AnchorStrides> strides;
  const AnchorLayout layout = class_layout(tensors, strides);
  const ClassWalk walk = choose_class_walk(tensors, strides);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "classification_loss", [&] {
    using acc_t = math::acc_type_t<scalar_t>;
    const auto run = [&](auto target_reader) {
      const ClassArgs<scalar_t, acc_t, decltype(target_reader)> args{
          pred.const_data_ptr<scalar_t>(),
          call.compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          outputs.per_anchor_data<acc_t>(),
          weight_data<acc_t>(anchor_weights),
          weight_data<acc_t>(class_weights),
          element_weight ? call.weight->const_data_ptr<acc_t>() : nullptr,
          outputs.per_element_data<acc_t>(),
          target_reader,
          layout,
          strides[0],
          strides[1],
          strides[2],
          strides[3],
          strides[4],
          {static_cast<acc_t>(params.exponent), static_cast<acc_t>(params.alpha_positive),
           static_cast<acc_t>(params.alpha_negative), static_cast<acc_t>(params.focal_base),
           static_cast<acc_t>(params.weights_positives), static_cast<acc_t>(params.iou_weighted),
           static_cast<acc_t>(params.detach_weight)}};
      launch(std::integral_constant<math::Modulation, kModulation>{}, args, call.activated, call.compute_grad, walk,
             outputs.total_data<acc_t>());
    };
    if (!dense && scores.defined()) {
      run(math::LabelTarget<acc_t>{labels.const_data_ptr<int64_t>(), scores.const_data_ptr<acc_t>()});
    } else if (!dense) {
      if constexpr (kModulation == math::Modulation::kFocalFamily) {  // labels alone: focal's
        run(math::LabelTarget<acc_t, false>{labels.const_data_ptr<int64_t>(), nullptr});
      } else {
        TORCH_INTERNAL_ASSERT(false, call.op_name, ": labels without scores");
      }
    } else if (std::is_same_v<scalar_t, acc_t> || target.dense.scalar_type() == pred.scalar_type()) {
      // The target is read in its own dtype, pred's or the accumulation type (a float32
      // target of half pred, as AMP produces it): no N x C copy to convert it.
      run(math::DenseTarget<scalar_t, acc_t>{target.dense.const_data_ptr<scalar_t>()});
    } else {
      run(math::DenseTarget<acc_t, acc_t>{target.dense.const_data_ptr<acc_t>()});
    }
  });
  return {outputs.result(), grad};
}

// The modulation numbers of each loss (math::ModulationParams). QFL's: beta alone.
inline math::ModulationParams<double> quality_params(double beta) { return {beta, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0}; }

// Focal's: m = 1 - p_t, alpha_t = alpha t + (1 - alpha)(1 - t), or 1 when alpha < 0
// (torchvision's rule).
inline math::ModulationParams<double> focal_params(double alpha, double gamma) {
  const bool weighted = alpha >= 0;
  return {gamma, weighted ? alpha : 1.0, weighted ? 1.0 - alpha : 1.0, 1.0, 0.0, 0.0, 0.0};
}

// Varifocal's: m = p - t and alpha on the negatives; the positives weighted by t (or 1).
inline math::ModulationParams<double> varifocal_params(double alpha, double gamma, bool iou_weighted,
                                                       bool detach_weight) {
  return {gamma, alpha, alpha, 0.0, 1.0, iou_weighted ? 1.0 : 0.0, detach_weight ? 1.0 : 0.0};
}

// The target of the focal and varifocal operators: integer labels of the anchor shape (with
// a score, or alone: focal's) or a dense float target of pred's shape.
inline ClassTarget class_target(const at::Tensor& target, const std::optional<at::Tensor>& score, const char* op_name) {
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(!score.has_value(), op_name, ": score goes with integer labels, not with a dense float target");
    return {at::Tensor(), at::Tensor(), target};
  }
  TORCH_CHECK(target.scalar_type() == at::kLong, op_name, ": an integer target (labels) must be int64, got ",
              target.scalar_type());
  return {target, score.has_value() ? *score : at::Tensor(), at::Tensor()};
}

// The pair every kernel returns: the value (the loss, or the integral) and d value / d pred.
using KernelOutputs = std::tuple<at::Tensor, at::Tensor>;

struct QualityFocalLoss {
  static constexpr const char* kName = "quality_focal_loss";
  static constexpr const char* kPublicSignature =
      "(Tensor pred, Tensor label, Tensor score, Tensor? weight, Tensor? class_weight, float beta, bool activated, "
      "str reduction, str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor label, Tensor score, Tensor? weight, Tensor? class_weight, float beta, bool activated, "
      "str reduction, bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred, const at::Tensor& label,
                           const at::Tensor& score, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& class_weight, double beta, bool activated,
                           c10::string_view reduction, bool compute_grad) {
    const ClassCall call{kName, weight, class_weight, beta, "beta", activated, reduction, false, compute_grad};
    return class_loss_impl<math::Modulation::kQuality>(pred, {label, score, at::Tensor()}, call, quality_params(beta),
                                                       launchers.classification(pred));
  }
};

struct QualityFocalLossDense {
  static constexpr const char* kName = "quality_focal_loss_dense";
  static constexpr const char* kPublicSignature =
      "(Tensor pred, Tensor target, Tensor? weight, Tensor? class_weight, float beta, bool activated, str reduction, "
      "str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor target, Tensor? weight, Tensor? class_weight, float beta, bool activated, str reduction, "
      "bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& class_weight,
                           double beta, bool activated, c10::string_view reduction, bool compute_grad) {
    const ClassCall call{kName, weight, class_weight, beta, "beta", activated, reduction, false, compute_grad};
    return class_loss_impl<math::Modulation::kQuality>(pred, {at::Tensor(), at::Tensor(), target}, call,
                                                       quality_params(beta), launchers.classification(pred));
  }
};

struct SigmoidFocalLoss {
  static constexpr const char* kName = "sigmoid_focal_loss";
  static constexpr const char* kPublicSignature =
      "(Tensor pred, Tensor target, Tensor? weight, Tensor? class_weight, float alpha, float gamma, bool activated, "
      "str reduction, str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor target, Tensor? weight, Tensor? class_weight, float alpha, float gamma, bool activated, "
      "str reduction, bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& class_weight,
                           double alpha, double gamma, bool activated, c10::string_view reduction, bool compute_grad) {
    TORCH_CHECK(std::isfinite(alpha), kName, ": alpha must be finite, got ", alpha);
    const ClassCall call{kName, weight, class_weight, gamma, "gamma", activated, reduction, true, compute_grad};
    return class_loss_impl<math::Modulation::kFocalFamily>(pred, class_target(target, std::nullopt, kName), call,
                                                           focal_params(alpha, gamma), launchers.classification(pred));
  }
};

struct VarifocalLoss {
  static constexpr const char* kName = "varifocal_loss";
  static constexpr const char* kPublicSignature =
      "(Tensor pred, Tensor target, Tensor? score, Tensor? weight, Tensor? class_weight, float alpha, float gamma, "
      "bool iou_weighted, bool detach_weight, bool activated, str reduction, str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor target, Tensor? score, Tensor? weight, Tensor? class_weight, float alpha, float gamma, "
      "bool iou_weighted, bool detach_weight, bool activated, str reduction, bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred, const at::Tensor& target,
                           const std::optional<at::Tensor>& score, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& class_weight, double alpha, double gamma, bool iou_weighted,
                           bool detach_weight, bool activated, c10::string_view reduction, bool compute_grad) {
    TORCH_CHECK(std::isfinite(alpha), kName, ": alpha must be finite, got ", alpha);
    TORCH_CHECK(score.has_value() || at::isFloatingType(target.scalar_type()), kName,
                ": integer labels need a score (the IoU target of the labelled class)");
    const ClassCall call{kName, weight, class_weight, gamma, "gamma", activated, reduction, true, compute_grad};
    return class_loss_impl<math::Modulation::kFocalFamily>(pred, class_target(target, score, kName), call,
                                                           varifocal_params(alpha, gamma, iou_weighted, detach_weight),
                                                           launchers.classification(pred));
  }
};

struct DistributionFocalLoss {
  static constexpr const char* kName = "distribution_focal_loss";
  static constexpr const char* kPublicSignature =
      "(Tensor pred, Tensor target, Tensor? weight, str reduction, str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor target, Tensor? weight, str reduction, bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, c10::string_view reduction, bool compute_grad) {
    check_dfl_inputs(pred, target);
    check_weight(pred, weight, {pred.size(0)}, kName);
    const LossOutputs outputs({pred.size(0)}, target.options(), parse_reduction(reduction, kName));
    at::Tensor grad = allocate_grad(pred, compute_grad);
    if (pred.size(0) == 0) {
      return {outputs.result_of_no_anchors(), grad};
    }
    const at::Tensor targets = target.contiguous();
    const std::optional<at::Tensor> weights = contiguous_weight(weight);
    const auto launch = launchers.dfl(pred);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), kName, [&] {
      using acc_t = math::acc_type_t<scalar_t>;
      launch(make_bin_rows<scalar_t>(pred, grad, compute_grad), targets.const_data_ptr<acc_t>(),
             weight_data<acc_t>(weights), outputs.per_anchor_data<acc_t>(), outputs.total_data<acc_t>());
    });
    return {outputs.result(), grad};
  }
};

struct DistributionIntegral {
  static constexpr const char* kName = "distribution_integral";
  static constexpr const char* kPublicSignature = "(Tensor pred, str backend=\"native\") -> Tensor";
  static constexpr const char* kKernelSignature =
      "(Tensor pred, Tensor? grad_scale, bool compute_grad) -> (Tensor, Tensor)";

  template <typename Launchers>
  static KernelOutputs run(const Launchers& launchers, const at::Tensor& pred,
                           const std::optional<at::Tensor>& grad_scale, bool compute_grad) {
    check_bin_inputs(pred, kName);
    check_weight(pred, grad_scale, {pred.size(0)}, kName);
    at::Tensor value = at::empty({pred.size(0)}, pred.options());
    at::Tensor grad = allocate_grad(pred, compute_grad);
    if (pred.size(0) == 0) {
      return {value, grad};
    }
    const std::optional<at::Tensor> grad_scales = contiguous_weight(grad_scale);
    const auto launch = launchers.integral(pred);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), kName, [&] {
      using acc_t = math::acc_type_t<scalar_t>;
      launch(make_bin_rows<scalar_t>(pred, grad, compute_grad), weight_data<acc_t>(grad_scales),
             value.mutable_data_ptr<scalar_t>());
    });
    return {value, grad};
  }
};

// Operators grouped by the work their kernels do. Each group registers in its own translation
// unit per device, so that the devices' kernels compile in parallel (the CPU's and CUDA's are
// each a few thousand template instantiations).
template <typename... Operators>
struct OperatorList {};

using QualityOperators = OperatorList<QualityFocalLoss, QualityFocalLossDense>;  // Modulation::kQuality
using FocalFamilyOperators = OperatorList<SigmoidFocalLoss, VarifocalLoss>;      // Modulation::kFocalFamily
using BoxOperators = OperatorList<DistributionFocalLoss, DistributionIntegral>;
using AllOperators = OperatorList<QualityFocalLoss, QualityFocalLossDense, SigmoidFocalLoss, VarifocalLoss,
                                  DistributionFocalLoss, DistributionIntegral>;

// The name of an operator's kernels, plans or other companions: _<operator>_<suffix>.
inline std::string companion_name(const char* op_name, const char* suffix) {
  return std::string("_") + op_name + "_" + suffix;
}

// Op's body bound to `Launchers`, as a function whose arguments are the kernel's: its type
// gives the kernel's C++ signature to the bindings below and to the plans'.
template <typename Op, typename Launchers>
using BodyOf = decltype(&Op::template run<Launchers>);

// Op's _<operator>_native kernel on one device: the body with the device's launchers, under
// the device's guard. Device provides a Guard (constructed from pred's device: the device
// guard, or nothing) and the launchers classification(pred), dfl(pred) and integral(pred).
template <typename Op, typename Device, typename Body = BodyOf<Op, Device>>
struct NativeKernel;

template <typename Op, typename Device, typename... Arguments>
struct NativeKernel<Op, Device, KernelOutputs (*)(const Device&, Arguments...)> {
  static KernelOutputs call(Arguments... arguments) {
    const at::Tensor& pred = std::get<0>(std::forward_as_tuple(arguments...));
    const typename Device::Guard guard(pred.device());
    return Op::run(Device{}, arguments...);
  }
};

// Registers the operators' native kernels on Device (in a TORCH_LIBRARY_IMPL of its dispatch key).
template <typename Device, typename... Operators>
void register_native_kernels(torch::Library& m, OperatorList<Operators...> /*operators*/) {
  (m.impl(companion_name(Operators::kName, "native").c_str(), &NativeKernel<Operators, Device>::call), ...);
}

// A Guard for devices that need none (the CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(const c10::Device& /*device*/) {}
};

}  // namespace gfl
