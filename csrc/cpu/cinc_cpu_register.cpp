// Registers the CPU kernels for the op schemas of csrc/cinc_ops.cpp.
#include <torch/library.h>

#include "cinc_cpu.h"

TORCH_LIBRARY_IMPL(cinc, CPU, m) {
  m.impl("forward", &cinc::cpu::forward_cpu);
  m.impl("inverse", &cinc::cpu::inverse_cpu);
  m.impl("inverse_transpose", &cinc::cpu::inverse_transpose_cpu);
  m.impl("logdet", &cinc::cpu::logdet_cpu);
}
