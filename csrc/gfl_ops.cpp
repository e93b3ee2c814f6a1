// Operator schemas of the gfl_ops namespace and their autograd kernel. Host-side helpers:
// gfl_ops_host.cpp; kernels: cpu/gfl_kernels_cpu.cpp (and cuda/ when built with CUDA).
// Fake kernels, and the autograd formula of the Triton operators, are registered from
// Python (gfl_ops/_ops.py).
#include "gfl_ops.h"

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

// The loss operators return (loss, grad). loss: with reduction "none", one value per anchor
// (QFL) or row (DFL), times `weight` when one is given; with "sum", the sum of those values
// as a 0-dim tensor, added up inside the operator in a fixed order. float32 for half pred,
// pred's dtype otherwise. grad: when compute_grad is true, d loss / d pred (of every
// per-anchor value, whatever the reduction) in pred's dtype and layout, an empty tensor
// otherwise. Gradients flow to pred only (weight and targets are constants); the autograd
// kernel below scales that gradient buffer in place by the incoming gradient,
// so pred is read once per training step: the buffer is the operator's scratch, not a
// result to keep. No double backward. The integral returns (E, dE/dpred) the same way.
//
// The namespace is gfl_ops; a second build of this file may name another one (the tests
// build it as gfl_ops_cuda_emulated, with the CUDA kernels run under an emulator, to drive
// those kernels through these very schemas and this autograd kernel).
#ifndef GFL_OPS_NAMESPACE
#define GFL_OPS_NAMESPACE gfl_ops
#endif
// TORCH_LIBRARY pastes its namespace argument into names: expand GFL_OPS_NAMESPACE first.
#define GFL_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GFL_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

GFL_TORCH_LIBRARY(GFL_OPS_NAMESPACE, m) {
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

// Tensors whose backward must be functional (no in-place scaling): those torch.compile
// (AOTAutograd) traces with (fake or functional tensors, or a dispatch mode on the stack),
// and batched incoming gradients (autograd.grad(is_grads_batched=True), gradcheck's
// check_batched_grad, vectorised jacobians; legacy or functorch vmap), which an unbatched
// buffer cannot be scaled by in place.
bool is_traced(const at::Tensor& tensor) {
  return tensor.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                                        c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched})) ||
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
    const bool functional =
        is_traced(grad_loss) || (gradient_saved && !consumed && is_traced(ctx->saved_data["gradient"].toTensor()));
    TORCH_CHECK(functional || !at::GradMode::is_enabled(), "gfl_ops: double backward (create_graph=True) is not ",
                "supported by the fused operators; use backend='reference' for higher-order gradients");
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
    if (functional) {
      input_grads[0] = (grad * scale).to(grad.scalar_type());  // the compiler reuses the buffer
      return input_grads;
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

GFL_TORCH_LIBRARY_IMPL(GFL_OPS_NAMESPACE, Autograd, m) {
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
