// The bodies of the native kernels, shared by the CPU and CUDA registrations: each checks its
// inputs, allocates its outputs, describes the memory layout and hands typed kernel
// arguments to the device's launcher, the only part that differs between devices.
//
//   qfl launcher:      launch(const QflArgs<scalar_t, acc_t, Target>&, activated, compute_grad, QflWalk, acc_t* total)
//   dfl launcher:      launch(const BinRows<scalar_t>&, const acc_t* target, const acc_t* weight, acc_t* loss,
//                             acc_t* total)
//   integral launcher: launch(const BinRows<scalar_t>&, const acc_t* grad_scale, scalar_t* value)
//
// The loss launchers write one loss per anchor (row) into the loss buffer (reduction "none")
// or, when `total` is not null (reduction "sum", the loss buffer then null), the sum of
// those losses into *total (device memory), added up in a fixed order. The integral's
// launcher scales row r's gradient by grad_scale[r] (1 when grad_scale is null).
#pragma once

#include "gfl_math.h"
#include "gfl_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace gfl {

// The operator's loss output: the per-anchor losses (reduction "none"), or their 0-dim sum
// (reduction "sum"), for which no per-anchor vector is allocated: the launchers add up as
// they go (their loss pointer is then null).
struct LossOutputs {
  at::Tensor per_anchor;  // undefined for reduction "sum"
  at::Tensor total;       // undefined for reduction "none"

  LossOutputs(at::IntArrayRef anchor_shape, const at::TensorOptions& options, LossReduction reduction) {
    if (reduction == LossReduction::kSum) {
      total = at::empty({}, options);  // the launcher writes it (no fill kernel on CUDA)
    } else {
      per_anchor = at::empty(anchor_shape, options);
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
  acc_t* total_data() const {
    return total.defined() ? total.mutable_data_ptr<acc_t>() : nullptr;
  }

  const at::Tensor& result() const { return total.defined() ? total : per_anchor; }
};

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> quality_focal_loss_impl(const at::Tensor& pred, const at::Tensor& label,
                                                           const at::Tensor& score,
                                                           const std::optional<at::Tensor>& weight, double beta,
                                                           bool activated, c10::string_view reduction,
                                                           bool compute_grad, const Launch& launch) {
  check_qfl_inputs(pred, label, score, beta);
  check_weight(pred, weight, anchor_shape(pred), "quality_focal_loss");
  const LossOutputs outputs(anchor_shape(pred), qfl_loss_options(pred), parse_reduction(reduction, "quality_focal_loss"));
  at::Tensor grad = allocate_grad(pred, compute_grad);
  if (pred.numel() == 0) {
    return {outputs.result_of_no_anchors(), grad};
  }
  const at::Tensor labels = label.contiguous();
  const at::Tensor scores = score.contiguous();
  const std::optional<at::Tensor> weights = contiguous_weight(weight);
  std::vector<AnchorStrides> strides;
  const AnchorLayout layout = qfl_layout(pred, grad, compute_grad, nullptr, strides);
  const QflWalk walk = choose_qfl_walk(strides, compute_grad, /*dense_target=*/false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "quality_focal_loss", [&] {
    using acc_t = math::acc_type_t<scalar_t>;
    const QflArgs<scalar_t, acc_t, math::LabelScoreTarget<acc_t>> args{
        pred.const_data_ptr<scalar_t>(),
        compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
        outputs.per_anchor_data<acc_t>(),
        weight_data<acc_t>(weights),
        {labels.const_data_ptr<int64_t>(), scores.const_data_ptr<acc_t>()},
        layout, strides[0], strides[1], strides[2], static_cast<acc_t>(beta)};
    launch(args, activated, compute_grad, walk, outputs.total_data<acc_t>());
  });
  return {outputs.result(), grad};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> quality_focal_loss_dense_impl(const at::Tensor& pred, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight, double beta,
                                                                 bool activated, c10::string_view reduction,
                                                                 bool compute_grad, const Launch& launch) {
  check_qfl_dense_inputs(pred, target, beta);
  check_weight(pred, weight, anchor_shape(pred), "quality_focal_loss_dense");
  const LossOutputs outputs(anchor_shape(pred), qfl_loss_options(pred),
                            parse_reduction(reduction, "quality_focal_loss_dense"));
  at::Tensor grad = allocate_grad(pred, compute_grad);
  if (pred.numel() == 0) {
    return {outputs.result_of_no_anchors(), grad};
  }
  const std::optional<at::Tensor> weights = contiguous_weight(weight);
  std::vector<AnchorStrides> strides;
  const AnchorLayout layout = qfl_layout(pred, grad, compute_grad, &target, strides);
  const QflWalk walk = choose_qfl_walk(strides, compute_grad, /*dense_target=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "quality_focal_loss_dense", [&] {
    using acc_t = math::acc_type_t<scalar_t>;
    // The target is read in its own dtype, pred's or the accumulation type (a float32 target
    // of half pred, as AMP produces it): no N x C copy to convert it.
    const auto run = [&](auto target_type) {
      using target_t = decltype(target_type);
      const QflArgs<scalar_t, acc_t, math::DenseTarget<target_t, acc_t>> args{
          pred.const_data_ptr<scalar_t>(),
          compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
          outputs.per_anchor_data<acc_t>(),
          weight_data<acc_t>(weights),
          {target.const_data_ptr<target_t>()},
          layout, strides[0], strides[1], strides[2], static_cast<acc_t>(beta)};
      launch(args, activated, compute_grad, walk, outputs.total_data<acc_t>());
    };
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      run(scalar_t{});
    } else if (target.scalar_type() == pred.scalar_type()) {
      run(scalar_t{});
    } else {
      run(acc_t{});
    }
  });
  return {outputs.result(), grad};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> distribution_focal_loss_impl(const at::Tensor& pred, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                c10::string_view reduction, bool compute_grad,
                                                                const Launch& launch) {
  check_dfl_inputs(pred, target);
  check_weight(pred, weight, {pred.size(0)}, "distribution_focal_loss");
  const LossOutputs outputs({pred.size(0)}, target.options(), parse_reduction(reduction, "distribution_focal_loss"));
  at::Tensor grad = allocate_grad(pred, compute_grad);
  if (pred.size(0) == 0) {
    return {outputs.result_of_no_anchors(), grad};
  }
  const at::Tensor targets = target.contiguous();
  const std::optional<at::Tensor> weights = contiguous_weight(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "distribution_focal_loss", [&] {
    using acc_t = math::acc_type_t<scalar_t>;
    launch(make_bin_rows<scalar_t>(pred, grad, compute_grad), targets.const_data_ptr<acc_t>(),
           weight_data<acc_t>(weights), outputs.per_anchor_data<acc_t>(), outputs.total_data<acc_t>());
  });
  return {outputs.result(), grad};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> distribution_integral_impl(const at::Tensor& pred,
                                                              const std::optional<at::Tensor>& grad_scale,
                                                              bool compute_grad, const Launch& launch) {
  check_bin_inputs(pred, "distribution_integral");
  check_weight(pred, grad_scale, {pred.size(0)}, "distribution_integral");
  at::Tensor value = at::empty({pred.size(0)}, pred.options());
  at::Tensor grad = allocate_grad(pred, compute_grad);
  if (pred.size(0) == 0) {
    return {value, grad};
  }
  const std::optional<at::Tensor> grad_scales = contiguous_weight(grad_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "distribution_integral", [&] {
    using acc_t = math::acc_type_t<scalar_t>;
    launch(make_bin_rows<scalar_t>(pred, grad, compute_grad), weight_data<acc_t>(grad_scales),
           value.mutable_data_ptr<scalar_t>());
  });
  return {value, grad};
}

// The kernels _<operator>_native of one device: the operator bodies above with the device's
// launchers. Device provides a Guard (constructed from pred.device(): the device guard, or
// nothing) and the launchers Device::qfl(pred), Device::dfl(pred) and Device::integral(pred).
template <typename Device>
struct NativeKernels {
  static std::tuple<at::Tensor, at::Tensor> quality_focal_loss(const at::Tensor& pred, const at::Tensor& label,
                                                               const at::Tensor& score,
                                                               const std::optional<at::Tensor>& weight, double beta,
                                                               bool activated, c10::string_view reduction,
                                                               bool compute_grad) {
    const typename Device::Guard guard(pred.device());
    return quality_focal_loss_impl(pred, label, score, weight, beta, activated, reduction, compute_grad,
                                   Device::qfl(pred));
  }

  static std::tuple<at::Tensor, at::Tensor> quality_focal_loss_dense(const at::Tensor& pred, const at::Tensor& target,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double beta, bool activated,
                                                                     c10::string_view reduction, bool compute_grad) {
    const typename Device::Guard guard(pred.device());
    return quality_focal_loss_dense_impl(pred, target, weight, beta, activated, reduction, compute_grad,
                                         Device::qfl(pred));
  }

  static std::tuple<at::Tensor, at::Tensor> distribution_focal_loss(const at::Tensor& pred, const at::Tensor& target,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    c10::string_view reduction, bool compute_grad) {
    const typename Device::Guard guard(pred.device());
    return distribution_focal_loss_impl(pred, target, weight, reduction, compute_grad, Device::dfl(pred));
  }

  static std::tuple<at::Tensor, at::Tensor> distribution_integral(const at::Tensor& pred,
                                                                  const std::optional<at::Tensor>& grad_scale,
                                                                  bool compute_grad) {
    const typename Device::Guard guard(pred.device());
    return distribution_integral_impl(pred, grad_scale, compute_grad, Device::integral(pred));
  }
};

// Registers NativeKernels<Device> as the kernels of one dispatch key (in TORCH_LIBRARY_IMPL).
template <typename Device>
void register_native_kernels(torch::Library& m) {
  m.impl("_quality_focal_loss_native", &NativeKernels<Device>::quality_focal_loss);
  m.impl("_quality_focal_loss_dense_native", &NativeKernels<Device>::quality_focal_loss_dense);
  m.impl("_distribution_focal_loss_native", &NativeKernels<Device>::distribution_focal_loss);
  m.impl("_distribution_integral_native", &NativeKernels<Device>::distribution_integral);
}

// A Guard for devices that need none (the CPU).
struct NoDeviceGuard {
  explicit NoDeviceGuard(const c10::Device& /*device*/) {}
};

}  // namespace gfl
