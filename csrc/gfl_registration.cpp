// The gfl_ops operators' schemas, defined from AllOperators (gfl_operators.h), each checked
// against the contract the autograd kernel (gfl_autograd.cpp) relies on.
//
// Two layers of operators:
//   - the public operators, what users call. Each returns what was asked for (the loss per
//     anchor, element or row, or its sum; the integral's value), differentiable with respect
//     to pred by the autograd kernel. `str backend` names the kernels that compute it:
//     "native" (the C++ CPU and CUDA kernels) or "triton" (gfl_ops/triton/).
//   - their kernels, _<operator>_native and _<operator>_triton: one schema per operator, the
//     same for every backend, with an implementation per backend (cpu/, cuda/ and the Triton
//     one, registered from Python). A kernel makes one pass over pred and returns fresh
//     (value, d value / d pred) tensors; it has no autograd of its own.
// The _<operator>_plan operators (gfl_triton_plans.cpp) run the native host code (checks,
// outputs, layout, modulation numbers) for the Triton kernels, so that those exist once.
//
// Fake kernels are registered from Python (gfl_ops/_registry.py). The namespace is gfl_ops; a
// second build of this file may name another one (the tests build it as
// gfl_ops_cuda_emulated, with the CUDA kernels run under an emulator, to drive those
// kernels through these very schemas and the autograd kernel).
#include <Python.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>

#include "gfl_operators.h"

namespace gfl {
namespace {

constexpr const char* kBackends[] = {"native", "triton"};

bool is_optional_tensor(const c10::Argument& argument) {
  return argument.type()->isSubtypeOf(*c10::OptionalType::ofTensor()) &&
         !argument.type()->isSubtypeOf(*c10::TensorType::get());
}

bool has_type(const c10::Argument& argument, const c10::TypePtr& type) { return *argument.type() == *type; }

bool returns_tensors(const c10::FunctionSchema& schema, size_t count) {
  const auto& returns = schema.returns();
  return returns.size() == count && std::all_of(returns.begin(), returns.end(), [](const c10::Argument& value) {
           return *value.type() == *c10::TensorType::get();
         });
}

// The contract between an operator's public and kernel signatures that the autograd kernel
// relies on: `Tensor pred` first in both; the public `str backend` last, and one Tensor
// returned; the kernel's `bool compute_grad` last (the backward sets it), and (value, grad)
// returned; every public argument but backend passed to the kernel by name, with its type,
// and no other kernel argument but a `Tensor?` (the autograd kernel passes None for it); a
// `Tensor? weight` or `Tensor? grad_scale` in the kernel, where the backward pass puts
// weight * d total / d value; the kernel's `reduction` (which the backward pass sets to
// "sum") exactly where the public operator has one.
void check_kernel_contract(const std::string& name, const c10::FunctionSchema& public_schema,
                           const c10::FunctionSchema& kernel_schema) {
  const auto& public_arguments = public_schema.arguments();
  const auto& kernel_arguments = kernel_schema.arguments();
  const auto fail = [&](const std::string& problem) {
    TORCH_CHECK(false, "gfl_ops: operator ", name, " breaks the kernel contract: ", problem);
  };
  const c10::TypePtr tensor = c10::TensorType::get();
  if (public_arguments.empty() || kernel_arguments.empty() || public_arguments.front().name() != "pred" ||
      kernel_arguments.front().name() != "pred" || !has_type(public_arguments.front(), tensor) ||
      !has_type(kernel_arguments.front(), tensor)) {
    fail("`Tensor pred` must be the first argument of both signatures");
  }
  if (public_arguments.back().name() != "backend" || !has_type(public_arguments.back(), c10::StringType::get()) ||
      !returns_tensors(public_schema, 1)) {
    fail("the public signature must end with `str backend` and return one Tensor");
  }
  if (kernel_arguments.back().name() != "compute_grad" || !has_type(kernel_arguments.back(), c10::BoolType::get()) ||
      !returns_tensors(kernel_schema, 2)) {
    fail("the kernel signature must end with `bool compute_grad` and return (value, grad)");
  }
  for (size_t i = 0; i + 1 < public_arguments.size(); ++i) {
    const std::optional<int> index = kernel_schema.argumentIndexWithName(public_arguments[i].name());
    if (!index.has_value() || *kernel_arguments[*index].type() != *public_arguments[i].type()) {
      fail("the kernel must take `" + public_arguments[i].name() + "` with the public signature's type");
    }
  }
  for (size_t i = 0; i + 1 < kernel_arguments.size(); ++i) {
    if (!public_schema.argumentIndexWithName(kernel_arguments[i].name()) && !is_optional_tensor(kernel_arguments[i])) {
      fail("the kernel's own argument `" + kernel_arguments[i].name() + "` must be a `Tensor?`");
    }
  }
  const std::optional<int> weight = kernel_schema.argumentIndexWithName("weight");
  const std::optional<int> scale = weight.has_value() ? weight : kernel_schema.argumentIndexWithName("grad_scale");
  if (!scale.has_value() || !is_optional_tensor(kernel_arguments[*scale])) {
    fail("the kernel must take `Tensor? weight` or `Tensor? grad_scale` (the backward pass's scale)");
  }
  if (public_schema.argumentIndexWithName("reduction").has_value() !=
      kernel_schema.argumentIndexWithName("reduction").has_value()) {
    fail("`reduction` must be in both signatures or in neither");
  }
}

// The kernel signature with the plan's outputs: the kernel's (value, grad), allocated, and
// the layout and modulation numbers the Triton kernels are launched with.
std::string plan_signature(const std::string& kernel_signature) {
  return kernel_signature.substr(0, kernel_signature.find(" -> ")) +
         " -> (Tensor, Tensor, Dict(str, int[]), Dict(str, float))";
}

template <typename... Operators>
void define_operators(torch::Library& m, OperatorList<Operators...> /*operators*/) {
  for (const auto& op :
       {std::array<const char*, 3>{Operators::kName, Operators::kPublicSignature, Operators::kKernelSignature}...}) {
    const std::string name = op[0];
    check_kernel_contract(name, torch::jit::parseSchema(name + op[1]), torch::jit::parseSchema(name + op[2]));
    m.def((name + op[1]).c_str());
    for (const char* backend : kBackends) {
      m.def((companion_name(op[0], backend) + op[2]).c_str());
    }
    m.def((companion_name(op[0], "plan") + plan_signature(op[2])).c_str());
  }
}

// The contract check on two signatures, for the tests: raises what a registration would.
void check_signatures(const std::string& public_signature, const std::string& kernel_signature) {
  check_kernel_contract("checked", torch::jit::parseSchema("checked" + public_signature),
                        torch::jit::parseSchema("checked" + kernel_signature));
}

}  // namespace
}  // namespace gfl

GFL_TORCH_LIBRARY(GFL_OPS_NAMESPACE, m) {
  gfl::define_operators(m, gfl::AllOperators{});
  m.def("_check_kernel_contract(str public_signature, str kernel_signature) -> ()", &gfl::check_signatures);
}

// A Python module with no methods: importing gfl_ops._C loads the library, which registers
// the operators above with the dispatcher.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
