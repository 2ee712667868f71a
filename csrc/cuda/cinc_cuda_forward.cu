// The forward y = M x + bias on CUDA: a direct convolution with the top-left padding and the mask applied while
// loading, so there is no padded copy of x and no masked copy of the weight. A block computes a tile of output pixels
// of one image for kOutGroup output channels; it walks the input channels in chunks of kInChunk, staging the chunk's
// input tile (with its k-1 halo above and to the left, zeros outside the image) and the matching masked weights in
// shared memory. Each thread keeps kOutGroup accumulators for its pixel; every weight read is a warp-wide broadcast
// (float32: two 16-byte loads per tap for the 8 output channels). k = 3 has its own path: staging indices fixed
// before the channel loop, the taps unrolled, and the chunks double-buffered so that the next chunk's loads overlap
// the current chunk's arithmetic.
// float16/bfloat16 load and store in their own type and stage and accumulate in float32 (at::opmath_type). Where
// cuDNN has faster arithmetic (float16/bfloat16, float32 with TF32 allowed) backend="auto" runs cuDNN instead
// (cinc_kernels/backends.py).
//
// The kernel and its launch configuration are in cinc_forward_kernel.cuh (tests/cuda_emulation/ runs them as written
// on CPU threads); this file is the torch glue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cuda.h"
#include "cinc_forward_kernel.cuh"

namespace cinc {
namespace cuda {
namespace {

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 bool unit_diagonal, at::Tensor& y) {
  using Acc = at::opmath_type<T>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int k = static_cast<int>(weight.size(3));
  ForwardParams<T> p;
  p.x = x.data_ptr<T>();
  p.x_stride_b = x.stride(0);
  p.x_stride_c = x.stride(1);
  p.x_stride_h = x.stride(2);
  p.x_stride_w = x.stride(3);
  p.weight = weight.data_ptr<T>();
  p.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  p.y = y.data_ptr<T>();
  p.C = C;
  p.H = H;
  p.W = W;
  p.k = k;
  p.unit_diagonal = unit_diagonal;
  int64_t tiles_h = 0;
  const ForwardLaunch l = configure_forward<T, Acc>(p, B, &tiles_h);
  TORCH_CHECK(tiles_h * p.tiles_w <= INT32_MAX, "x: image too large for the CUDA forward's grid");
  TORCH_CHECK(l.blocks <= INT32_MAX && l.groups <= 65535, "x: shape ", x.sizes(), " exceeds the CUDA forward's grid");
  auto kernel = forward_kernel<T, Acc>;
  if (l.shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(l.shared_bytes)));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  kernel<<<dim3(static_cast<unsigned int>(l.blocks), static_cast<unsigned int>(l.groups)), dim3(l.tile_w, l.tile_h),
           l.shared_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool unit_diagonal) {
  check_conv_args(x, "x", weight, bias);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernels, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cinc_forward_cuda",
                                  [&] { run_forward<scalar_t>(x, w, bc, unit_diagonal, y); });
  return y;
}

}  // namespace cuda
}  // namespace cinc
