// The C++ autograd kernel that differentiates every gfl_ops operator on every backend, and the
// gradient pass it follows. Registered for each operator of AllOperators (gfl_operators.h) in
// the namespace gfl_registration.cpp defines them in.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "gfl_operators.h"

// ---------------------------------------------------------------------------------------
// Where a training step computes pred's gradient, per device type:
//   - forward: the kernel writes d loss / d pred in the forward pass and backward scales it
//     in place (fewer flops, one more pass over memory: for compute-bound CPUs);
//   - backward: the forward only reads pred, and backward runs the kernel again with
//     weight * d total / d loss as its per-anchor weight, writing the final gradient in one
//     pass (3 passes over pred's size per step instead of 4: for memory-bound GPUs).
// float16 pred always takes the backward pass: a gradient stored in float16 before the
// backward scales it (by GradScaler's 2^16, by 1 / avg_factor) would lose its small values
// to float16's range (nothing below 6e-8), where the backward pass rounds the scaled
// gradient once. GFL_OPS_GRADIENT_PASS=forward|backward sets every device at load time;
// _set_gradient_pass sets one.
// ---------------------------------------------------------------------------------------
namespace {

enum class GradientPass : int { kForward, kBackward };

GradientPass parse_gradient_pass(c10::string_view value) {
  TORCH_CHECK_VALUE(value == "forward" || value == "backward", "gfl_ops: the gradient pass must be \"forward\" or ",
                    "\"backward\", got \"", std::string(value), "\"");
  return value == "forward" ? GradientPass::kForward : GradientPass::kBackward;
}

GradientPass pass_from_environment(GradientPass device_default) {
  const char* value = std::getenv("GFL_OPS_GRADIENT_PASS");
  return value == nullptr ? device_default : parse_gradient_pass(value);
}

// [0]: CPU, [1]: every other device (CUDA).
std::atomic<GradientPass> gradient_passes[2] = {pass_from_environment(GradientPass::kForward),
                                                pass_from_environment(GradientPass::kBackward)};

std::atomic<GradientPass>& gradient_pass_of(c10::string_view device_type) {
  return gradient_passes[device_type == "cpu" ? 0 : 1];
}

std::string gradient_pass(c10::string_view device_type) {
  return gradient_pass_of(device_type).load() == GradientPass::kForward ? "forward" : "backward";
}

void set_gradient_pass(c10::string_view device_type, c10::string_view pass) {
  gradient_pass_of(device_type).store(parse_gradient_pass(pass));
}

bool gradient_in_forward(const at::Tensor& pred) {
  const int device = pred.device().type() == c10::DeviceType::CPU ? 0 : 1;
  return pred.scalar_type() != at::kHalf && gradient_passes[device].load() == GradientPass::kForward;
}

}  // namespace

GFL_TORCH_LIBRARY_FRAGMENT(GFL_OPS_NAMESPACE, m) {
  m.def("_gradient_pass(str device_type) -> str", &gradient_pass);
  m.def("_set_gradient_pass(str device_type, str gradient_pass) -> ()", &set_gradient_pass);
}

// ---------------------------------------------------------------------------------------
// Autograd, one kernel for every public operator and backend, in C++ so that a training
// step pays no Python on the way (PyTorch's Python wrapper of registered autograd formulas
// costs tens of microseconds per call, as much as a DFL kernel at 16k rows). Each anchor's
// loss (each row's value) depends only on its own row of pred, so
//
//   d total / d pred[n, c, ...] = d total / d loss[n, ...] * d loss[n, ...] / d pred[n, c, ...]
//
// with one scalar d total / d loss for a summed loss, broadcast over the class (bin)
// dimension 1; an elementwise loss's "none" (focal, varifocal) has one d total / d loss per
// element instead. The gradient pass (above) says whether the forward's kernel call computes
// d loss / d pred (scaled in place by backward) or backward calls the kernel again with
// weight * d total / d loss as its weight (the integral: its grad_scale).
// Gradients flow to pred only: targets and weights are constants.
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
  return tensor.key_set().has_any(
             c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize, c10::DispatchKey::Batched,
                                  c10::DispatchKey::FuncTorchBatched})) ||
         at::functionalization::impl::isFunctionalTensor(tensor) || c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// The kernel that computes a public operator on a backend: <namespace>::_<operator>_<backend>.
c10::OperatorHandle kernel_of(const c10::OperatorHandle& op, const std::string& backend) {
  const std::string& name = op.schema().name();
  const size_t separator = name.find("::") + 2;
  TORCH_CHECK_VALUE(backend == "native" || backend == "triton", name.substr(separator),
                    ": backend must be \"native\" or \"triton\", got \"", backend, "\"");
  const std::string kernel = name.substr(0, separator) + "_" + name.substr(separator) + "_" + backend;
  return c10::Dispatcher::singleton().findSchemaOrThrow(kernel.c_str(), "");
}

// The position of the argument called `name` in the operator's schema, or -1.
int64_t argument_index(const c10::OperatorHandle& op, const char* name) {
  const std::optional<int> index = op.schema().argumentIndexWithName(name);
  return index.has_value() ? *index : -1;
}

// The kernel's arguments: the public operator's, by name, and compute_grad; none for the
// integral's grad_scale (the backward sets it).
torch::jit::Stack kernel_arguments(const c10::OperatorHandle& kernel, const c10::OperatorHandle& op,
                                   const torch::jit::Stack& public_arguments, bool compute_grad) {
  torch::jit::Stack arguments;
  for (const c10::Argument& argument : kernel.schema().arguments()) {
    const int64_t index = argument_index(op, argument.name().c_str());
    if (index >= 0) {
      arguments.push_back(public_arguments[index]);
    } else if (argument.name() == "compute_grad") {
      arguments.emplace_back(compute_grad);
    } else {
      arguments.emplace_back();
    }
  }
  return arguments;
}

// The kernel's (value, grad) from its boxed arguments, computed below autograd.
std::pair<at::Tensor, at::Tensor> call_below_autograd(const c10::OperatorHandle& kernel, torch::jit::Stack stack) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  kernel.callBoxed(stack);
  return {stack[0].toTensor(), stack[1].toTensor()};
}

// The kernel's arguments as saved for backward: the tensors as saved variables (version
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

// Whether a loss (its value or incoming gradient) has one value per element of pred, as the
// elementwise losses' reduction "none" (focal, varifocal); otherwise it has one per anchor
// (row) or is a 0-dim sum.
bool is_per_element(const at::Tensor& loss, const at::Tensor& pred) { return loss.dim() == pred.dim(); }

// The factor d total / d pred = factor * d loss / d pred, with the kernel's own weight, in the
// shape the kernel takes as its weight: pred's for an elementwise loss's "none" or a weight
// of pred's shape, the anchors' otherwise.
at::Tensor gradient_factor(const at::Tensor& pred, const at::Tensor& grad_loss, const c10::IValue& weight) {
  const bool has_weight = weight.isTensor();
  if (is_per_element(grad_loss, pred) || (has_weight && is_per_element(weight.toTensor(), pred))) {
    if (!has_weight) {
      return grad_loss;
    }
    const at::Tensor& w = weight.toTensor();
    return grad_loss * (is_per_element(w, pred) ? w : w.unsqueeze(1));
  }
  // pred's anchor shape in symbolic sizes, so that torch.compile(dynamic=True) traces it
  // without specialising on N.
  c10::SymDimVector anchor_sizes{pred.sym_size(0)};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    anchor_sizes.push_back(pred.sym_size(d));
  }
  const at::Tensor factor = grad_loss.expand_symint(anchor_sizes);
  return has_weight ? factor * weight.toTensor() : factor;
}

// d total / d pred in one pass: the kernel with weight * d total / d loss as its weight (the
// integral: as its grad_scale), and reduction "sum", whose loss output, unused, is one number.
at::Tensor recompute_scaled_gradient(const c10::OperatorHandle& kernel, torch::jit::Stack arguments,
                                     const at::Tensor& grad_loss) {
  const at::Tensor& pred = arguments[0].toTensor();
  const int64_t weight_index = argument_index(kernel, "weight");
  const int64_t scale_index = weight_index >= 0 ? weight_index : argument_index(kernel, "grad_scale");
  const at::Tensor factor = gradient_factor(pred, grad_loss, arguments[scale_index]);
  arguments[scale_index] = factor.to(gfl::accumulate_dtype(pred.scalar_type())).contiguous();
  const int64_t reduction_index = argument_index(kernel, "reduction");
  if (reduction_index >= 0) {
    arguments[reduction_index] = std::string("sum");
  }
  arguments.back() = true;
  return call_below_autograd(kernel, std::move(arguments)).second;
}

class FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
 public:
  // Compiled autograd may trace the backward (it sees the functional form: is_traced).
  static constexpr bool is_traceable = true;

  // pred: arguments[0], passed on its own so that autograd tracks it (and only it).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const c10::OperatorHandle& kernel,
                               torch::jit::Stack arguments) {
    arguments[0] = pred;
    auto [value, grad] = call_below_autograd(kernel, arguments);
    save_arguments(ctx, arguments);
    ctx->saved_data["kernel"] = kernel.schema().name();
    // A plain reference, not a saved variable: the eager backward scales it in place.
    ctx->saved_data["gradient"] = grad;
    ctx->saved_data["gradient_consumed"] = false;
    return {value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list input_grads(3);  // pred, kernel, arguments
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) {
      return input_grads;
    }
    torch::jit::Stack arguments = saved_arguments(ctx);
    const c10::OperatorHandle kernel =
        c10::Dispatcher::singleton().findSchemaOrThrow(ctx->saved_data["kernel"].toStringRef().c_str(), "");
    const bool gradient_saved = arguments.back().toBool();
    const bool consumed = ctx->saved_data["gradient_consumed"].toBool();
    const bool functional =
        is_traced(grad_loss) || (gradient_saved && !consumed && is_traced(ctx->saved_data["gradient"].toTensor()));
    TORCH_CHECK(functional || !at::GradMode::is_enabled(), "gfl_ops: double backward (create_graph=True) is not ",
                "supported by the fused operators; use backend='reference' for higher-order gradients");
    if (!gradient_saved) {
      input_grads[0] = recompute_scaled_gradient(kernel, std::move(arguments), grad_loss);
      return input_grads;
    }
    const at::Tensor pred = arguments[0].toTensor();
    const at::Tensor scale =
        grad_loss.dim() == 0 || is_per_element(grad_loss, pred) ? grad_loss : grad_loss.unsqueeze(1);
    // A second backward through the same graph (retain_graph=True, gradcheck, jacobians)
    // after the first one scaled the saved buffer in place and handed it over: compute the
    // gradient again.
    const at::Tensor grad =
        consumed ? call_below_autograd(kernel, std::move(arguments)).second : ctx->saved_data["gradient"].toTensor();
    if (functional) {
      input_grads[0] = (grad * scale).to(grad.scalar_type());  // the compiler reuses the buffer
      return input_grads;
    }
    ctx->saved_data["gradient_consumed"] = true;
    // Scaled in place and handed over, so the saved buffer becomes pred's gradient and a
    // training step holds one buffer of pred's size, not two: with no other reference left,
    // autograd stores it as pred.grad without a copy. The buffer was never an output.
    ctx->saved_data["gradient"] = c10::IValue();
    input_grads[0] = grad.mul_(scale);
    return input_grads;
  }
};

// The Autograd kernel of every public operator: its boxed arguments in, its value out.
void public_operator_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_arguments = op.schema().arguments().size();
  const torch::jit::Stack arguments(stack->end() - num_arguments, stack->end());
  torch::jit::drop(*stack, num_arguments);
  const at::Tensor pred = arguments[0].toTensor();
  const c10::OperatorHandle kernel = kernel_of(op, arguments.back().toStringRef());
  const bool gradient_now = at::GradMode::is_enabled() && pred.requires_grad() && gradient_in_forward(pred);
  variable_list value = FusedLossFunction::apply(pred, kernel, kernel_arguments(kernel, op, arguments, gradient_now));
  stack->emplace_back(std::move(value[0]));
}

// Without autograd (inference mode): the kernel's value alone.
void public_operator_value(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_arguments = op.schema().arguments().size();
  const torch::jit::Stack arguments(stack->end() - num_arguments, stack->end());
  torch::jit::drop(*stack, num_arguments);
  const c10::OperatorHandle kernel = kernel_of(op, arguments.back().toStringRef());
  stack->emplace_back(call_below_autograd(kernel, kernel_arguments(kernel, op, arguments, false)).first);
}

template <void (*kKernel)(const c10::OperatorHandle&, torch::jit::Stack*), typename... Operators>
void register_public_operators(torch::Library& m, gfl::OperatorList<Operators...> /*operators*/) {
  (m.impl(Operators::kName, torch::CppFunction::makeFromBoxedFunction<kKernel>()), ...);
}

}  // namespace

GFL_TORCH_LIBRARY_IMPL(GFL_OPS_NAMESPACE, Autograd, m) {
  register_public_operators<&public_operator_autograd>(m, gfl::AllOperators{});
}

GFL_TORCH_LIBRARY_IMPL(GFL_OPS_NAMESPACE, CPU, m) {
  register_public_operators<&public_operator_value>(m, gfl::AllOperators{});
}

GFL_TORCH_LIBRARY_IMPL(GFL_OPS_NAMESPACE, CUDA, m) {
  register_public_operators<&public_operator_value>(m, gfl::AllOperators{});
}
