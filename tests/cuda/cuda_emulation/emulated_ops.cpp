// The CUDA kernels of csrc/cuda/gfl_kernels.cuh built by the host compiler and run on CPU
// tensors under the emulator of the CUDA execution model (cuda_emulator.h), registered as
// the CPU kernels of the gfl_ops_cuda_emulated operators. tests/cuda/test_cuda_emulation.py
// links this file with csrc/gfl_registration.cpp and gfl_autograd.cpp built for that namespace (the schemas and the C++
// autograd kernel of gfl_ops) and csrc/gfl_anchor_layout.cpp, gfl_checks.cpp; the kernels registered below are the
// native kernels of gfl_operators.h with the CUDA launchers: the test drives the CUDA code path end to end (host
// checks, layouts, the choice of walk and vector width, the launches, the kernels, the block sums, both gradient passes
// of the autograd kernel), only the compiler and the device differ.
#include <cstddef>
#include <cstdint>

#include "cuda_emulator.h"

namespace gfl {
namespace cuda {
using cuda_emulator::launch_kernel;
}  // namespace cuda

namespace emulation {

// The width of the kernels' widest access (gfl::cuda::kVectorBytes, checked below).
constexpr std::size_t kWideAccessBytes = 16;

// Accesses of kWideAccessBytes the kernels made since the test last asked: whether a walk
// read and wrote whole vectors, which results alone cannot tell. The emulator runs every
// thread on the calling OS thread, so a plain counter is exact.
int64_t wide_access_count = 0;

// Every load_vector / store_vector: its alignment checked (a misaligned vector access
// faults on a GPU; here it throws), wide ones counted.
inline void check_vector_access(const void* pointer, std::size_t bytes) {
  ::cuda_emulator::check_aligned(pointer, bytes, "a vector access");
  if (bytes == kWideAccessBytes) {
    ++wide_access_count;
  }
}

int64_t take_wide_access_count() {
  const int64_t count = wide_access_count;
  wide_access_count = 0;
  return count;
}

}  // namespace emulation
}  // namespace gfl

#define GFL_ASSERT_ALIGNED(pointer, bytes) ::gfl::emulation::check_vector_access(pointer, bytes)

#include <torch/library.h>

#include "cuda/gfl_kernels.cuh"

static_assert(gfl::emulation::kWideAccessBytes == gfl::cuda::kVectorBytes, "count the kernels' widest accesses");

namespace gfl {
namespace {

// The CUDA launchers on the emulator's default stream, for NativeKernel (gfl_operators.h).
struct EmulatedCudaDevice {
  using Guard = NoDeviceGuard;
  static cuda::ClassLaunch classification(const at::Tensor& pred) { return {nullptr, pred.options()}; }
  static cuda::DflLaunch dfl(const at::Tensor& pred) { return {nullptr, pred.options()}; }
  static cuda::IntegralLaunch integral(const at::Tensor& /*pred*/) { return {nullptr}; }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(gfl_ops_cuda_emulated, m) {
  m.def("take_wide_access_count() -> int", &emulation::take_wide_access_count);
}

TORCH_LIBRARY_IMPL(gfl_ops_cuda_emulated, CPU, m) { register_native_kernels<EmulatedCudaDevice>(m, AllOperators{}); }

}  // namespace gfl
