// Registers the CUDA kernels for the op schemas of csrc/cinc_ops.cpp; the Python side (fake impls, autograd,
// backend="cuda") needs nothing else.
#include <torch/library.h>

#include "cinc_cuda.h"

TORCH_LIBRARY_IMPL(cinc, CUDA, m) {
  m.impl("forward", &cinc::cuda::forward_cuda);
  m.impl("inverse", &cinc::cuda::inverse_cuda);
  m.impl("inverse_transpose", &cinc::cuda::inverse_transpose_cuda);
  m.impl("logdet", &cinc::cuda::logdet_cuda);
}
