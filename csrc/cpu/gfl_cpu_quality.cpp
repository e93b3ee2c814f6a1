// The CPU kernels of QFL's two operators (gfl_kernels_cpu.h).
#include "gfl_kernels_cpu.h"

namespace gfl {

TORCH_LIBRARY_IMPL(gfl_ops, CPU, m) { register_native_kernels<CpuDevice>(m, QualityOperators{}); }

}  // namespace gfl
