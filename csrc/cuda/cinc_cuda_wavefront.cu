// The inverse x = M⁻¹(y - bias) and its adjoint u = M⁻ᵀ g on CUDA: two launches per call.
//
// wavefront_coefficients_kernel turns the weight into the coefficients of the substitution (L⁻¹ and -L⁻¹ W_tap, or
// their adjoint forms) in a workspace; wavefront_kernel then walks the H + W - 1 anti-diagonals of every image, one
// block per image or, on sm_90 when the batch leaves SMs idle, a thread-block cluster per image whose blocks own
// disjoint output channels and exchange each diagonal through distributed shared memory. The kernels, their steps
// and the launch plan are in cinc_wavefront_kernel.cuh and cinc_wavefront_block.h (ATen-free:
// tests/cuda_emulation/ runs them as written on CPU threads); the performance model is docs/gpu-performance.md.
//
// A singular L (a zero on the centre tap's diagonal) is not checked here: checking would need a device-to-host sync.
// L⁻¹ then holds inf and the output inf/nan. The Python docs say so.
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

int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

WavefrontDevice wavefront_device(int device) {
  WavefrontDevice d;
  d.multiprocessors = device_attribute(cudaDevAttrMultiProcessorCount, device);
  d.shared_per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  d.shared_per_multiprocessor = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  d.max_cluster = device_attribute(cudaDevAttrClusterLaunch, device) != 0 ? 8 : 1;
  return d;
}

// CINC_CUDA_WAVEFRONT_THREADS / CINC_CUDA_WAVEFRONT_BLOCKS override the plan's threads per block and blocks per
// image (benchmarks/bench_gpu.py sweeps them).
int environment_int(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atoi(env) : 0;
}

template <typename Kernel>
void allow_shared(Kernel kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The wavefront launch: a cluster dimension for the cluster kernels, and (sm_90) programmatic dependent launch, so
// that its prologue overlaps the coefficient kernel before it in the stream (the kernel waits for it in
// wait_for_prerequisites()).
template <bool kCluster>
cudaLaunchConfig_t wavefront_config(const WavefrontPlan& plan, int64_t batch, cudaStream_t stream,
                                    bool dependent_launch, cudaLaunchAttribute* attributes) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned int>(batch * plan.blocks_per_image));
  config.blockDim = dim3(static_cast<unsigned int>(plan.threads));
  config.dynamicSmemBytes = static_cast<size_t>(plan.shared_bytes);
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = 0;
  if (kCluster) {
    cudaLaunchAttribute& a = attributes[config.numAttrs++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = static_cast<unsigned int>(plan.blocks_per_image);
    a.val.clusterDim.y = 1;
    a.val.clusterDim.z = 1;
  }
  if (dependent_launch) {
    cudaLaunchAttribute& a = attributes[config.numAttrs++];
    a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a.val.programmaticStreamSerializationAllowed = 1;
  }
  return config;
}

template <typename T, bool kAdjoint, bool kRingShared, bool kWeightsShared, bool kCluster>
void launch_wavefront(const WavefrontPlan& plan, const WavefrontParams<T>& p, int64_t batch, cudaStream_t stream,
                      bool dependent_launch) {
  auto kernel = wavefront_kernel<T, kAdjoint, kRingShared, kWeightsShared, kCluster>;
  allow_shared(kernel, plan.shared_bytes);
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = wavefront_config<kCluster>(plan, batch, stream, dependent_launch, attributes);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

// Whether the device can hold one cluster of the plan's blocks at once (a cluster's blocks must be resident together
// on one GPC).
template <typename T, bool kAdjoint, bool kWeightsShared>
bool cluster_fits(const WavefrontPlan& plan, int64_t batch, cudaStream_t stream) {
  auto kernel = wavefront_kernel<T, kAdjoint, true, kWeightsShared, true>;
  allow_shared(kernel, plan.shared_bytes);
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = wavefront_config<true>(plan, batch, stream, false, attributes);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error: the caller falls back to one block per image
    return false;
  }
  return clusters > 0;
}

template <typename T, bool kAdjoint>
void dispatch_wavefront(const WavefrontPlan& plan, const WavefrontParams<T>& p, int64_t batch, cudaStream_t stream,
                        bool dependent) {
  if (plan.blocks_per_image > 1) {
    plan.weights_in_shared ? launch_wavefront<T, kAdjoint, true, true, true>(plan, p, batch, stream, dependent)
                           : launch_wavefront<T, kAdjoint, true, false, true>(plan, p, batch, stream, dependent);
  } else if (!plan.ring_in_shared) {
    launch_wavefront<T, kAdjoint, false, false, false>(plan, p, batch, stream, dependent);
  } else {
    plan.weights_in_shared ? launch_wavefront<T, kAdjoint, true, true, false>(plan, p, batch, stream, dependent)
                           : launch_wavefront<T, kAdjoint, true, false, false>(plan, p, batch, stream, dependent);
  }
}

template <typename T>
void run_wavefront(const at::Tensor& rhs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   bool unit_diagonal, bool adjoint, at::Tensor& out) {
  const int64_t B = rhs.size(0), C = rhs.size(1), H = rhs.size(2), W = rhs.size(3);
  const int k = static_cast<int>(weight.size(3));
  const int device = rhs.get_device();

  WavefrontParams<T> p{};
  p.rhs = rhs.data_ptr<T>();
  p.rhs_stride_b = rhs.stride(0);
  p.rhs_stride_c = rhs.stride(1);
  p.rhs_stride_h = rhs.stride(2);
  p.rhs_stride_w = rhs.stride(3);
  p.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  p.out = out.data_ptr<T>();
  p.C = C;
  p.H = H;
  p.W = W;
  p.k = k;
  const WavefrontDevice device_limits = wavefront_device(device);
  WavefrontDevice limits = device_limits;
  const int forced_threads = environment_int("CINC_CUDA_WAVEFRONT_THREADS");
  const int forced_blocks = environment_int("CINC_CUDA_WAVEFRONT_BLOCKS");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  WavefrontPlan plan = plan_wavefront(p, B, limits, forced_threads, forced_blocks);
  if (plan.fits && plan.blocks_per_image > 1) {
    const bool fits = adjoint ? (plan.weights_in_shared ? cluster_fits<T, true, true>(plan, B, stream)
                                                        : cluster_fits<T, true, false>(plan, B, stream))
                              : (plan.weights_in_shared ? cluster_fits<T, false, true>(plan, B, stream)
                                                        : cluster_fits<T, false, false>(plan, B, stream));
    if (!fits) {
      limits.max_cluster = 1;
      plan = plan_wavefront(p, B, limits, forced_threads, forced_blocks);
    }
  }
  TORCH_CHECK(plan.fits, "the CUDA ", adjoint ? "inverse_transpose" : "inverse",
              " keeps L and L⁻¹ and one anti-diagonal's partial sums in shared memory, which needs more than the ",
              limits.shared_per_block, " bytes this GPU has per block for C = ", C, " and dtype ", rhs.scalar_type(),
              "; use backend=\"torch\" (any device) or backend=\"cpu\" (after .cpu()) for so many channels");

  at::Tensor workspace =
      at::empty({plan.coefficient_elements + B * plan.ring_global_elements}, rhs.options().memory_format(
                                                                                  at::MemoryFormat::Contiguous));
  T* coefficients = workspace.data_ptr<T>();
  p.coefficients = coefficients;
  p.ring_global = coefficients + plan.coefficient_elements;

  const dim3 coefficient_grid(static_cast<unsigned int>(k * k), static_cast<unsigned int>(plan.coefficient_chunks));
  const size_t coefficient_shared = static_cast<size_t>(plan.coefficient_shared_bytes);
  if (adjoint) {
    auto kernel = wavefront_coefficients_kernel<T, true>;
    allow_shared(kernel, plan.coefficient_shared_bytes);
    kernel<<<coefficient_grid, kCoefficientThreads, coefficient_shared, stream>>>(
        weight.data_ptr<T>(), C, k, unit_diagonal, p.padded_channels, coefficients);
  } else {
    auto kernel = wavefront_coefficients_kernel<T, false>;
    allow_shared(kernel, plan.coefficient_shared_bytes);
    kernel<<<coefficient_grid, kCoefficientThreads, coefficient_shared, stream>>>(
        weight.data_ptr<T>(), C, k, unit_diagonal, p.padded_channels, coefficients);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Programmatic dependent launch needs sm_90, the first architecture with clusters.
  const bool dependent = device_limits.max_cluster > 1;
  adjoint ? dispatch_wavefront<T, true>(plan, p, B, stream, dependent)
          : dispatch_wavefront<T, false>(plan, p, B, stream, dependent);
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
  // Up to 8 blocks per image in a grid of at most 2^31 - 1 blocks; a diagonal's items are counted in int.
  TORCH_CHECK(rhs.size(0) <= INT32_MAX / 8, name, ": batch ", rhs.size(0), " exceeds the CUDA grid limit");
  TORCH_CHECK(rhs.size(2) * rhs.size(3) <= INT32_MAX &&
                  rhs.size(1) * std::min(rhs.size(2), rhs.size(3)) <= INT32_MAX / 8,
              name, ": H·W and C·min(H, W) must stay below 2^31");
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
