// Operator schemas of the gfl_ops namespace and the host-side helpers every device's
// implementation shares. Kernels: cpu/gfl_kernels_cpu.cpp (and cuda/ when built with CUDA).
// Fake kernels and autograd formulas are registered from Python (gfl_ops/_ops.py).
#include "gfl_ops.h"

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace gfl {

std::vector<int64_t> anchor_shape(const at::Tensor& pred) {
  std::vector<int64_t> shape{pred.size(0)};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    shape.push_back(pred.size(d));
  }
  return shape;
}

AnchorLayout make_anchor_layout(const std::vector<at::Tensor>& tensors,
                                std::vector<AnchorStrides>& strides_out) {
  const at::Tensor& pred = tensors.front();
  AnchorLayout layout;
  layout.num_classes = pred.size(1);
  layout.num_anchors = 1;
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    dims.push_back(d);
  }
  for (int64_t d : dims) {
    layout.num_anchors *= pred.size(d);
  }

  // Groups of merged dimensions, innermost first: a size and each tensor's stride.
  struct Group {
    int64_t size;
    std::vector<int64_t> strides;
  };
  std::vector<Group> groups;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    const int64_t size = pred.size(*it);
    if (size == 1) {
      continue;  // a size-1 dimension contributes nothing to any offset
    }
    std::vector<int64_t> strides;
    for (const at::Tensor& t : tensors) {
      strides.push_back(t.stride(*it));
    }
    bool merges = !groups.empty();
    for (size_t t = 0; merges && t < tensors.size(); ++t) {
      merges = strides[t] == groups.back().strides[t] * groups.back().size;
    }
    if (merges) {
      groups.back().size *= size;
    } else {
      groups.push_back({size, strides});
    }
  }
  if (groups.empty()) {
    groups.push_back({1, std::vector<int64_t>(tensors.size(), 0)});
  }
  TORCH_CHECK(static_cast<int>(groups.size()) <= kMaxAnchorDims + 1,
              "gfl_ops: pred has too many non-mergeable anchor dimensions (at most ",
              kMaxAnchorDims + 1, ")");

  layout.inner_size = groups.front().size;
  layout.num_outer_dims = static_cast<int>(groups.size()) - 1;
  strides_out.assign(tensors.size(), AnchorStrides{});
  for (size_t t = 0; t < tensors.size(); ++t) {
    strides_out[t].class_stride = tensors[t].stride(1);
    strides_out[t].inner_stride = groups.front().strides[t];
  }
  for (int d = 0; d < layout.num_outer_dims; ++d) {
    const Group& group = groups[groups.size() - 1 - d];  // outermost first
    layout.outer_sizes[d] = group.size;
    for (size_t t = 0; t < tensors.size(); ++t) {
      strides_out[t].outer_strides[d] = group.strides[t];
    }
  }
  return layout;
}

at::ScalarType accumulate_dtype(at::ScalarType pred_dtype) {
  return pred_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

void check_float_pred(const at::Tensor& pred, const char* op_name) {
  TORCH_CHECK(pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kDouble ||
                  pred.scalar_type() == at::kHalf || pred.scalar_type() == at::kBFloat16,
              op_name, ": pred must be float32, float64, float16 or bfloat16, got ",
              pred.scalar_type());
}

void check_beta(double beta) {
  TORCH_CHECK(std::isfinite(beta) && beta >= 0.0,
              "quality_focal_loss: beta must be finite and >= 0, got ", beta);
}

void check_class_pred(const at::Tensor& pred, const char* op_name) {
  check_float_pred(pred, op_name);
  TORCH_CHECK(pred.dim() >= 2, op_name, ": pred must be (N, C) or (B, C, d1, ..., dk), got ",
              pred.dim(), " dimension(s)");
  TORCH_CHECK(pred.size(1) > 0, op_name, ": pred has no classes (C = 0)");
}

void check_same_device(const at::Tensor& pred, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == pred.device(), name, " is on ", other.device(),
              " but pred is on ", pred.device());
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

void check_qfl_inputs(const at::Tensor& pred, const at::Tensor& label, const at::Tensor& score,
                      double beta) {
  check_class_pred(pred, "quality_focal_loss");
  check_beta(beta);
  check_same_device(pred, label, "label");
  check_same_device(pred, score, "score");
  const std::vector<int64_t> shape = anchor_shape(pred);
  TORCH_CHECK(label.sizes() == at::IntArrayRef(shape), "quality_focal_loss: label must have shape ",
              at::IntArrayRef(shape), " (pred without its class dimension), got ", label.sizes());
  TORCH_CHECK(score.sizes() == at::IntArrayRef(shape), "quality_focal_loss: score must have shape ",
              at::IntArrayRef(shape), ", got ", score.sizes());
  TORCH_CHECK(label.scalar_type() == at::kLong, "quality_focal_loss: label must be int64, got ",
              label.scalar_type());
  TORCH_CHECK(score.scalar_type() == accumulate_dtype(pred.scalar_type()),
              "quality_focal_loss: score must be ", accumulate_dtype(pred.scalar_type()),
              " for ", pred.scalar_type(), " pred, got ", score.scalar_type());
}

void check_qfl_dense_inputs(const at::Tensor& pred, const at::Tensor& target, double beta) {
  check_class_pred(pred, "quality_focal_loss_dense");
  check_beta(beta);
  check_same_device(pred, target, "target");
  TORCH_CHECK(target.sizes() == pred.sizes(), "quality_focal_loss_dense: target must have pred's shape ",
              pred.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type() ||
                  target.scalar_type() == accumulate_dtype(pred.scalar_type()),
              "quality_focal_loss_dense: target must have pred's dtype ", pred.scalar_type(), " or ",
              accumulate_dtype(pred.scalar_type()), ", got ", target.scalar_type());
}

void check_bin_inputs(const at::Tensor& pred, const char* op_name) {
  check_float_pred(pred, op_name);
  TORCH_CHECK(pred.dim() == 2, op_name, ": pred must be (M, n + 1), got ", pred.dim(),
              " dimension(s)");
  TORCH_CHECK(pred.size(1) >= 2, op_name, ": pred needs at least 2 bins, got ", pred.size(1));
}

void check_dfl_inputs(const at::Tensor& pred, const at::Tensor& target) {
  check_bin_inputs(pred, "distribution_focal_loss");
  check_same_device(pred, target, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == pred.size(0),
              "distribution_focal_loss: target must have shape (", pred.size(0), "), got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == accumulate_dtype(pred.scalar_type()),
              "distribution_focal_loss: target must be ", accumulate_dtype(pred.scalar_type()),
              " for ", pred.scalar_type(), " pred, got ", target.scalar_type());
}

void check_weight(const at::Tensor& pred, const std::optional<at::Tensor>& weight, at::IntArrayRef shape,
                  const char* op_name) {
  if (!weight.has_value()) {
    return;
  }
  check_same_device(pred, *weight, "weight");
  TORCH_CHECK(weight->sizes() == at::IntArrayRef(shape), op_name, ": weight must have the loss's shape ",
              shape, ", got ", weight->sizes());
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

at::TensorOptions qfl_loss_options(const at::Tensor& pred) {
  return pred.options().dtype(accumulate_dtype(pred.scalar_type()));
}

AnchorLayout qfl_layout(const at::Tensor& pred, const at::Tensor& grad, bool compute_grad,
                        const at::Tensor* dense_target, std::vector<AnchorStrides>& strides) {
  // Tensors that are not there take pred's place: their strides are computed and unused.
  return make_anchor_layout({pred, compute_grad ? grad : pred, dense_target != nullptr ? *dense_target : pred},
                            strides);
}

QflWalk choose_qfl_walk(const std::vector<AnchorStrides>& strides, bool need_grad, bool dense_target) {
  const AnchorStrides& pred = strides[0];
  const AnchorStrides& grad = strides[1];
  const AnchorStrides& target = strides[2];
  if (pred.class_stride == 1 && (!need_grad || grad.class_stride == 1) &&
      (!dense_target || target.class_stride == 1)) {
    return QflWalk::kRows;
  }
  if (pred.inner_stride == 1 && (!need_grad || grad.inner_stride == 1) &&
      (!dense_target || target.inner_stride == 1)) {
    return QflWalk::kPlanes;
  }
  return QflWalk::kStridedRows;
}

}  // namespace gfl

// The loss operators return (loss, grad). loss: with reduction "none", one value per anchor
// (QFL) or row (DFL), times `weight` when one is given; with "sum", the sum of those values
// as a 0-dim tensor, added up inside the operator in a fixed order. float32 for half pred,
// pred's dtype otherwise. grad: when compute_grad is true, d loss / d pred (of every
// per-anchor value, whatever the reduction) in pred's dtype and layout, an empty tensor
// otherwise. Gradients flow to pred only (weight and targets are constants); the autograd
// formula (gfl_ops/_ops.py) scales that gradient buffer in place by the incoming gradient,
// so pred is read once per training step: the buffer is the operator's scratch, not a
// result to keep. No double backward. The integral returns (E, dE/dpred) the same way.
TORCH_LIBRARY(gfl_ops, m) {
  m.def("quality_focal_loss(Tensor pred, Tensor label, Tensor score, Tensor? weight, float beta, "
        "bool activated, str reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("quality_focal_loss_dense(Tensor pred, Tensor target, Tensor? weight, float beta, bool activated, "
        "str reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("distribution_focal_loss(Tensor pred, Tensor target, Tensor? weight, str reduction, bool compute_grad) "
        "-> (Tensor, Tensor)");
  m.def("distribution_integral(Tensor pred, bool compute_grad) -> (Tensor, Tensor)");
}

// ---------------------------------------------------------------------------------------
// Autograd, in C++ so that a training step pays no Python on the way (PyTorch's Python
// wrapper of registered autograd formulas costs tens of microseconds per call, as much
// as a DFL kernel at 16k rows). One boxed kernel serves every operator: they all take pred
// first and compute_grad last, and return (loss, d loss / d pred). Each anchor's loss
// depends only on its own row of pred, so
//
//   d total / d pred[n, c, ...] = d total / d loss[n, ...] * d loss[n, ...] / d pred[n, c, ...]
//
// with one scalar d total / d loss for a summed loss, broadcast over the class (bin)
// dimension 1. Two ways to get there, chosen by the caller through compute_grad:
//   - compute_grad=True: the forward pass wrote d loss / d pred; backward scales it in
//     place (no second pass over pred; the choice for compute-bound CPUs);
//   - compute_grad=False: backward runs the operator again with weight * d total / d loss
//     as its per-anchor weight, which the kernels apply to the gradient they write: one
//     pass that reads pred and writes the final gradient (3 passes over pred's size per
//     step instead of 4; the choice for memory-bound GPUs). The integral has no weight:
//     its gradient is recomputed, then scaled.
// Gradients flow to pred only: targets and weights are constants. The Triton operators
// carry the compute_grad=True formula in Python (gfl_ops/_ops.py: setup_context, backward).
// ---------------------------------------------------------------------------------------
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Tensors that torch.compile (AOTAutograd) traces with: fake or functional tensors, or a
// dispatch mode on the stack. Their backward must be functional: no in-place scaling.
bool is_traced(const at::Tensor& tensor) {
  return tensor.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize})) ||
         at::functionalization::impl::isFunctionalTensor(tensor) || c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// The operator's (loss, grad) from its boxed arguments, computed below autograd.
std::pair<at::Tensor, at::Tensor> call_below_autograd(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.callBoxed(stack);
  return {stack[0].toTensor(), stack[1].toTensor()};
}

// The operator's arguments as saved for backward: the tensors as saved variables (version
// checked, released after backward), the rest as they are, None where a tensor was.
void save_arguments(AutogradContext* ctx, const torch::jit::Stack& arguments) {
  variable_list tensors;
  c10::List<int64_t> tensor_positions;
  c10::impl::GenericList others(c10::AnyType::get());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (arguments[i].isTensor()) {
      tensors.push_back(arguments[i].toTensor());
      tensor_positions.push_back(static_cast<int64_t>(i));
      others.push_back(c10::IValue());
    } else {
      others.push_back(arguments[i]);
    }
  }
  ctx->save_for_backward(tensors);
  ctx->saved_data["tensor_positions"] = std::move(tensor_positions);
  ctx->saved_data["arguments"] = std::move(others);
}

// The saved arguments, tensors back in place. Unpacking checks that no saved tensor was
// modified in place since the forward, and fails after the graph was freed, as PyTorch's
// own operators do.
torch::jit::Stack saved_arguments(AutogradContext* ctx) {
  torch::jit::Stack arguments = ctx->saved_data["arguments"].toList().vec();
  const variable_list tensors = ctx->get_saved_variables();
  const c10::List<int64_t> positions = ctx->saved_data["tensor_positions"].toIntList();
  for (size_t i = 0; i < tensors.size(); ++i) {
    arguments[positions.get(i)] = tensors[i];
  }
  return arguments;
}

// The position of the argument called `name` in the operator's schema, or -1.
int64_t argument_index(const c10::OperatorHandle& op, const char* name) {
  const std::optional<int> index = op.schema().argumentIndexWithName(name);
  return index.has_value() ? *index : -1;
}

// d total / d pred recomputed in one pass: the operator with weight * d total / d loss as
// its per-anchor weight (and reduction "sum", whose loss output, unused, is one number).
at::Tensor recompute_scaled_gradient(const c10::OperatorHandle& op, torch::jit::Stack arguments,
                                     const at::Tensor& grad_loss) {
  const at::Tensor& pred = arguments[0].toTensor();
  const int64_t weight_index = argument_index(op, "weight");
  // pred's anchor shape in symbolic sizes, so that torch.compile(dynamic=True) traces it
  // without specialising on N.
  c10::SymDimVector anchor_sizes{pred.sym_size(0)};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    anchor_sizes.push_back(pred.sym_size(d));
  }
  at::Tensor factor = grad_loss.expand_symint(anchor_sizes);
  if (arguments[weight_index].isTensor()) {
    factor = factor * arguments[weight_index].toTensor();
  }
  arguments[weight_index] = factor.to(gfl::accumulate_dtype(pred.scalar_type())).contiguous();
  arguments[argument_index(op, "reduction")] = std::string("sum");
  arguments.back() = true;
  return call_below_autograd(op, std::move(arguments)).second;
}

class FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
 public:
  // Compiled autograd may trace the backward (it sees the functional form: is_traced).
  static constexpr bool is_traceable = true;

  // pred: arguments[0], passed on its own so that autograd tracks it (and only it). The
  // operator's second output, the gradient buffer, goes to *gradient_output rather than
  // out of the Function: it is not differentiable, and a Function with non-differentiable
  // outputs is refused by compiled autograd.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const c10::OperatorHandle& op,
                               torch::jit::Stack arguments, at::Tensor* gradient_output) {
    arguments[0] = pred;
    auto [loss, grad] = call_below_autograd(op, arguments);
    save_arguments(ctx, arguments);
    ctx->saved_data["operator"] = op.schema().name();
    // A plain reference, not a saved variable: the eager backward scales it in place.
    ctx->saved_data["gradient"] = grad;
    ctx->saved_data["gradient_consumed"] = false;
    *gradient_output = std::move(grad);
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list input_grads(4);  // pred, op, arguments, gradient_output
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) {
      return input_grads;
    }
    torch::jit::Stack arguments = saved_arguments(ctx);
    const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow(ctx->saved_data["operator"].toStringRef().c_str(), "");
    const bool gradient_saved = arguments.back().toBool();
    TORCH_CHECK(gradient_saved || !at::GradMode::is_enabled() || is_traced(grad_loss),
                "gfl_ops: double backward (create_graph=True) is not supported by the fused operators; use ",
                "backend='reference' for higher-order gradients");
    if (!gradient_saved && argument_index(op, "weight") >= 0) {
      input_grads[0] = recompute_scaled_gradient(op, std::move(arguments), grad_loss);
      return input_grads;
    }
    const at::Tensor scale = grad_loss.dim() == 0 ? grad_loss : grad_loss.unsqueeze(1);
    const bool consumed = ctx->saved_data["gradient_consumed"].toBool();
    if (gradient_saved && !consumed && (is_traced(grad_loss) || is_traced(ctx->saved_data["gradient"].toTensor()))) {
      const at::Tensor& grad = ctx->saved_data["gradient"].toTensor();
      input_grads[0] = (grad * scale).to(grad.scalar_type());  // functional: the compiler reuses the buffer
      return input_grads;
    }
    TORCH_CHECK(!at::GradMode::is_enabled(), "gfl_ops: double backward (create_graph=True) is not supported by ",
                "the fused operators; use backend='reference' for higher-order gradients");
    at::Tensor grad;
    if (!gradient_saved || consumed) {
      // No gradient from the forward (compute_grad=False: the integral), or a second backward
      // through the same graph (retain_graph=True, gradcheck, jacobians) after the first one
      // scaled the saved buffer in place and handed it over: compute the gradient again.
      arguments.back() = true;
      grad = call_below_autograd(op, std::move(arguments)).second;
    } else {
      grad = ctx->saved_data["gradient"].toTensor();
    }
    ctx->saved_data["gradient_consumed"] = true;
    // Scaled in place and handed over, so the saved buffer becomes pred's gradient and a
    // training step holds one buffer of pred's size, not two: with no other reference left,
    // autograd stores it as pred.grad without a copy.
    ctx->saved_data["gradient"] = c10::IValue();
    grad.mul_(scale);
    input_grads[0] = std::move(grad);
    return input_grads;
  }
};

// The Autograd kernel of every operator: the boxed arguments in, (loss, grad) out.
void fused_loss_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_arguments = op.schema().arguments().size();
  torch::jit::Stack arguments(stack->end() - num_arguments, stack->end());
  torch::jit::drop(*stack, num_arguments);
  const at::Tensor pred = arguments[0].toTensor();
  at::Tensor grad;
  variable_list loss = FusedLossFunction::apply(pred, op, std::move(arguments), &grad);
  stack->emplace_back(std::move(loss[0]));
  stack->emplace_back(std::move(grad));
}

}  // namespace

TORCH_LIBRARY_IMPL(gfl_ops, Autograd, m) {
  for (const char* name : {"quality_focal_loss", "quality_focal_loss_dense", "distribution_focal_loss",
                           "distribution_integral"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fused_loss_autograd>());
  }
}

// A Python module with no methods: importing gfl_ops._C loads the library, which registers
// the operators above with the dispatcher.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
