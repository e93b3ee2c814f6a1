// The CPU kernels of DFL and the integral (gfl_kernels_cpu.h).
#include "gfl_kernels_cpu.h"

namespace gfl {

TORCH_LIBRARY_IMPL(gfl_ops, CPU, m) { register_native_kernels<CpuDevice>(m, BoxOperators{}); }

}  // namespace gfl
