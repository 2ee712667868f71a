// The log-determinant H·W·Σ_c log|L[c, c]| on CUDA (docs/spec.md §1): one block sums log|L[c, c]| in float64 and
// writes H·W times it: no host sync, -inf for a zero on the diagonal (as the CPU kernel).
//
// The kernel is logdet_kernel of cinc_forward_kernel.cuh (tests/cuda_emulation/ runs it as written on CPU threads);
// this file is the torch glue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cinc_checks.h"
#include "cinc_cuda.h"
#include "cinc_forward_kernel.cuh"

namespace cinc {
namespace cuda {

at::Tensor logdet_cuda(const at::Tensor& weight, int64_t height, int64_t width, bool unit_diagonal) {
  check_logdet_args(weight, height, width);
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor for the CUDA kernels, got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "the CUDA logdet supports float32 and float64, got weight of dtype ", weight.scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());
  // Not height * width == 0: that int64 product wraps to 0 at 2^32 × 2^32.
  if (unit_diagonal || height == 0 || width == 0 || weight.size(0) == 0) return at::zeros({}, weight.options());
  at::Tensor out = at::empty({}, weight.options());
  const at::Tensor w = weight.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "cinc_logdet_cuda", [&] {
    logdet_kernel<scalar_t><<<1, kLogdetThreads, kLogdetSharedBytes, stream>>>(
        w.data_ptr<scalar_t>(), w.size(0), static_cast<int>(w.size(3)),
        static_cast<double>(height) * static_cast<double>(width), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace cinc
