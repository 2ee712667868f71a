// The inverse x = M⁻¹(y - bias) and its adjoint u = M⁻ᵀ g on CUDA: ONE launch per call.
//
// Each thread block owns one image and walks all H + W - 1 anti-diagonals itself (from the top-left for the inverse,
// from the bottom-right for the adjoint), with __syncthreads() between the two steps of every diagonal:
//   A. residual r[c, p] = rhs - bias - (tap sum over the already solved neighbours), one block of 4 pixels ×
//      4 channels per thread;
//   B. channel substitution as C independent dot products with the precomputed L⁻¹ (x = L⁻¹ r, u = L⁻ᵀ r), one
//      (pixel, channel) per thread, instead of C dependent steps per pixel.
// The tap sums and the substitution that builds L⁻¹ are cinc_math.h's (causal_neighbour_block /
// anticausal_neighbour_block, which the CPU kernels also run; solve_lower_in_place); the dot products with L⁻¹
// (lower_inverse_*_row_dot) are cinc_wavefront_block.h's.
//
// Shared memory holds L⁻¹, a ring of the last 2(k-1) anti-diagonals of the solution (every neighbour a pixel reads
// lies on one of them), the current diagonal's residual and, when it fits, a copy of the weight;
// without room for the ring the solution is read back from the output in global memory (the block's own writes,
// visible after __syncthreads()). The kernel is in cinc_wavefront_kernel.cuh, its steps and the layout in
// cinc_wavefront_block.h; tests/cuda_emulation/ runs that kernel as written on CPU threads.
//
// Threads of a warp take consecutive pixels of the diagonal with the same channel, so weight and L⁻¹ reads are
// broadcasts and ring/residual reads are consecutive words.
//
// Performance model (not yet measured: no GPU was available when this was written; benchmarks/gpu_check.sh
// measures it). The residual step does (k²-1)·C multiply-adds per pixel and channel. One (pixel, channel) per
// thread would need a shared-memory load of the neighbour and a (broadcast) load of the weight per multiply-add, and
// shared-memory issue (~1 warp-wide load per clock per SM) would bound it: ~37 µs per diagonal, ~5 ms per call for
// B = 64, C = 48, 64×64 on 64 of the H200's 132 SMs. Blocks of 4 pixels × 4 channels per thread need 8 loads per 16
// multiply-adds instead of 32, which should bring that down ~4×. Next steps: split an image's channels over a
// cluster of 2-4 blocks (distributed shared memory for the ring, cluster barriers; this would also serve batch 1),
// then tensor-core MMA on the diagonal's (pixels × (k²-1)C) by ((k²-1)C × C) product, 3xTF32 to keep float32
// accuracy. Batch 1 today: one block of up to 512 threads (wavefront_threads).
//
// A singular L (a zero on the centre tap's diagonal) is NOT checked here: checking would need a device-to-host
// sync. L⁻¹ then holds inf and the output inf/nan. The Python docs say so.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cuda.h"
#include "cinc_wavefront_kernel.cuh"

namespace cinc {
namespace cuda {
namespace {

int shared_memory_limit(int device) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

int multiprocessors(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// CINC_CUDA_WAVEFRONT_THREADS overrides the heuristic of wavefront_threads (benchmarks/bench_gpu.py sweeps it).
int forced_wavefront_threads() {
  const char* env = std::getenv("CINC_CUDA_WAVEFRONT_THREADS");
  return env != nullptr ? std::atoi(env) : 0;
}

template <typename T, bool kAdjoint, bool kRing>
void launch_wavefront(const WavefrontParams<T>& p, int64_t batch, int threads, size_t shared_bytes,
                      cudaStream_t stream) {
  auto kernel = wavefront_kernel<T, kAdjoint, kRing>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)));
  kernel<<<static_cast<unsigned int>(batch), threads, shared_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_wavefront(const at::Tensor& rhs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   bool unit_diagonal, bool adjoint, at::Tensor& out) {
  const int64_t B = rhs.size(0), C = rhs.size(1), H = rhs.size(2), W = rhs.size(3);
  const int k = static_cast<int>(weight.size(3));
  const int device = rhs.get_device();

  WavefrontParams<T> p;
  p.rhs = rhs.data_ptr<T>();
  p.rhs_stride_b = rhs.stride(0);
  p.rhs_stride_c = rhs.stride(1);
  p.rhs_stride_h = rhs.stride(2);
  p.rhs_stride_w = rhs.stride(3);
  p.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  p.weight = weight.data_ptr<T>();
  p.out = out.data_ptr<T>();
  p.C = C;
  p.H = H;
  p.W = W;
  p.k = k;
  p.unit_diagonal = unit_diagonal;
  const int64_t limit_bytes = shared_memory_limit(device);
  const WavefrontLayout layout = configure_wavefront(p, limit_bytes);
  TORCH_CHECK(layout.fits, "the CUDA ", adjoint ? "inverse_transpose" : "inverse",
              " keeps L⁻¹ and one anti-diagonal in shared memory, which needs more than the ", limit_bytes,
              " bytes this GPU has per block for C = ", C, " and dtype ", rhs.scalar_type(),
              "; use backend=\"torch\" (any device) or backend=\"cpu\" (after .cpu()) for so many channels");
  const size_t shared_bytes = static_cast<size_t>(layout.total_elements) * sizeof(T);
  const bool use_ring = layout.use_ring;

  const int threads = wavefront_threads<T>(B, C, p.max_diagonal, multiprocessors(device), forced_wavefront_threads());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (adjoint) {
    use_ring ? launch_wavefront<T, true, true>(p, B, threads, shared_bytes, stream)
             : launch_wavefront<T, true, false>(p, B, threads, shared_bytes, stream);
  } else {
    use_ring ? launch_wavefront<T, false, true>(p, B, threads, shared_bytes, stream)
             : launch_wavefront<T, false, false>(p, B, threads, shared_bytes, stream);
  }
}

at::Tensor solve_cuda(const at::Tensor& rhs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      bool unit_diagonal, bool adjoint) {
  const char* name = adjoint ? "g" : "y";
  TORCH_CHECK(rhs.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels, got ", rhs.device());
  TORCH_CHECK(rhs.scalar_type() == at::kFloat || rhs.scalar_type() == at::kDouble, "the CUDA ",
              adjoint ? "inverse_transpose" : "inverse", " supports float32 and float64, got ", name, " of dtype ",
              rhs.scalar_type());
  const c10::cuda::CUDAGuard guard(rhs.device());
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  at::Tensor out = at::empty(rhs.sizes(), rhs.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  TORCH_CHECK(rhs.size(0) <= INT32_MAX, name, ": batch ", rhs.size(0), " exceeds the CUDA grid limit");
  TORCH_CHECK(rhs.size(2) * rhs.size(3) <= INT32_MAX, name, ": H·W must stay below 2^31");
  AT_DISPATCH_FLOATING_TYPES(rhs.scalar_type(), "cinc_wavefront_cuda",
                             [&] { run_wavefront<scalar_t>(rhs, w, bc, unit_diagonal, adjoint, out); });
  return out;
}

}  // namespace

at::Tensor inverse_cuda(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool unit_diagonal) {
  check_conv_args(y, "y", weight, bias);
  return solve_cuda(y, weight, bias, unit_diagonal, false);
}

at::Tensor inverse_transpose_cuda(const at::Tensor& g, const at::Tensor& weight, bool unit_diagonal) {
  check_conv_args(g, "g", weight, std::nullopt);
  return solve_cuda(g, weight, std::nullopt, unit_diagonal, true);
}

}  // namespace cuda
}  // namespace cinc
