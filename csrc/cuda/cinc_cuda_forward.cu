// The forward y = M x + bias and the log-determinant on CUDA.
//
// Forward: a direct convolution with the top-left padding and the mask applied while loading, so there is no padded
// copy of x and no masked copy of the weight. A block computes a tile of output pixels of one image for
// kOutGroup output channels; it walks the input channels in chunks of kInChunk, staging the chunk's input tile
// (with its k-1 halo above and to the left, zeros outside the image) and the matching masked weights in shared
// memory. Each thread keeps kOutGroup accumulators for its pixel; every weight read is a warp-wide broadcast
// (float32: two 16-byte loads per tap for the 8 output channels).
// float16/bfloat16 load and store in their own type and accumulate in float32 (at::opmath_type).
//
// Log-determinant: one block sums log|L[c, c]| in float64 and writes H·W times it: no host sync, -inf for a zero
// on the diagonal (as the CPU kernel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cuda.h"

namespace cinc {
namespace cuda {
namespace {

constexpr int kOutGroup = 8;
constexpr int kInChunk = 8;
constexpr int kMaxTileThreads = 256;

static_assert(kOutGroup == 8, "the float32 path of forward_kernel loads a tap's weights as two float4");

// The input tile's size in elements, rounded up so the weight tile after it starts 16-byte aligned.
__host__ __device__ inline int x_tile_elements(int halo_h, int halo_w) {
  return (kInChunk * halo_h * halo_w + 3) / 4 * 4;
}

template <typename T>
struct ForwardParams {
  const T* x;  // any strides
  int64_t x_stride_b, x_stride_c, x_stride_h, x_stride_w;
  const T* weight;  // (C, C, k, k), contiguous
  const T* bias;    // (C,) or nullptr
  T* y;             // (B, C, H, W), contiguous
  int64_t C, H, W;
  int k;
  bool unit_diagonal;
  int tiles_w;        // tiles per image row
  int tiles_per_image;
};

template <typename T>
__global__ void __launch_bounds__(kMaxTileThreads) forward_kernel(const ForwardParams<T> p) {
  using Acc = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int k = p.k;
  const int tile_w = blockDim.x, tile_h = blockDim.y;
  const int halo_w = tile_w + k - 1, halo_h = tile_h + k - 1;
  Acc* x_tile = reinterpret_cast<Acc*>(shared_bytes);  // [kInChunk][halo_h][halo_w]
  // [kInChunk][k·k][kOutGroup], 16-byte aligned: a tap's kOutGroup weights are two float4 loads (float32).
  Acc* w_tile = x_tile + x_tile_elements(halo_h, halo_w);

  const int64_t b = blockIdx.x / p.tiles_per_image;
  const int tile = blockIdx.x % p.tiles_per_image;
  const int64_t i0 = static_cast<int64_t>(tile / p.tiles_w) * tile_h;
  const int64_t j0 = static_cast<int64_t>(tile % p.tiles_w) * tile_w;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kOutGroup;
  const int tid = threadIdx.y * tile_w + threadIdx.x, threads = tile_w * tile_h;
  const int64_t C = p.C, H = p.H, W = p.W;
  const T* x = p.x + b * p.x_stride_b;

  Acc acc[kOutGroup];
#pragma unroll
  for (int g = 0; g < kOutGroup; ++g) acc[g] = Acc(0);

  for (int64_t c0 = 0; c0 < C; c0 += kInChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kInChunk, C - c0));
    // The input tile: row r of the halo is image row i0 + r - (k-1); outside the image (the padding) reads as 0.
    for (int e = tid; e < chunk * halo_h * halo_w; e += threads) {
      const int cc = e / (halo_h * halo_w), r = (e / halo_w) % halo_h, s = e % halo_w;
      const int64_t ii = i0 + r - (k - 1), jj = j0 + s - (k - 1);
      Acc v = Acc(0);
      if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
        v = static_cast<Acc>(x[(c0 + cc) * p.x_stride_c + ii * p.x_stride_h + jj * p.x_stride_w]);
      }
      x_tile[e] = v;
    }
    for (int e = tid; e < kOutGroup * kInChunk * k * k; e += threads) {
      const int g = e % kOutGroup, tap = (e / kOutGroup) % (k * k), cc = e / (kOutGroup * k * k);
      const int64_t o = o0 + g, c = c0 + cc;
      w_tile[e] = (o < C && c < C)
                      ? static_cast<Acc>(masked_weight(p.weight, o, c, tap / k, tap % k, C, k, p.unit_diagonal))
                      : Acc(0);
    }
    __syncthreads();
    for (int cc = 0; cc < chunk; ++cc) {
      for (int a = 0; a < k; ++a) {
        for (int bb = 0; bb < k; ++bb) {
          const Acc xv = x_tile[(cc * halo_h + threadIdx.y + a) * halo_w + threadIdx.x + bb];
          const Acc* wp = w_tile + ((cc * k + a) * k + bb) * kOutGroup;
          if constexpr (std::is_same<Acc, float>::value) {
            // Broadcast vector loads: 2 shared-memory instructions for 8 multiply-adds instead of 8.
            const float4 lo = *reinterpret_cast<const float4*>(wp);
            const float4 hi = *reinterpret_cast<const float4*>(wp + 4);
            acc[0] += lo.x * xv;
            acc[1] += lo.y * xv;
            acc[2] += lo.z * xv;
            acc[3] += lo.w * xv;
            acc[4] += hi.x * xv;
            acc[5] += hi.y * xv;
            acc[6] += hi.z * xv;
            acc[7] += hi.w * xv;
          } else {
#pragma unroll
            for (int g = 0; g < kOutGroup; ++g) acc[g] += wp[g] * xv;
          }
        }
      }
    }
    __syncthreads();
  }

  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  if (i >= H || j >= W) return;
#pragma unroll
  for (int g = 0; g < kOutGroup; ++g) {
    const int64_t o = o0 + g;
    if (o < C) {
      const Acc bias = p.bias != nullptr ? static_cast<Acc>(p.bias[o]) : Acc(0);
      p.y[((b * C + o) * H + i) * W + j] = static_cast<T>(acc[g] + bias);
    }
  }
}

int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n && p < (1 << 20)) p <<= 1;
  return p;
}

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 bool unit_diagonal, at::Tensor& y) {
  using Acc = at::opmath_type<T>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int k = static_cast<int>(weight.size(3));
  // Tile: up to 32 columns wide (coalesced rows), 256 pixels, never much larger than the image.
  const int tile_w = std::min(32, next_power_of_two(W));
  const int tile_h = std::min(next_power_of_two(H), kMaxTileThreads / tile_w);
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
  p.tiles_w = static_cast<int>((W + tile_w - 1) / tile_w);
  const int64_t tiles_h = (H + tile_h - 1) / tile_h;
  TORCH_CHECK(tiles_h * p.tiles_w <= INT32_MAX, "x: image too large for the CUDA forward's grid");
  p.tiles_per_image = static_cast<int>(tiles_h * p.tiles_w);
  const int64_t blocks = B * p.tiles_per_image, groups = (C + kOutGroup - 1) / kOutGroup;
  TORCH_CHECK(blocks <= INT32_MAX && groups <= 65535, "x: shape ", x.sizes(), " exceeds the CUDA forward's grid");
  const size_t shared_bytes =
      sizeof(Acc) * (x_tile_elements(tile_h + k - 1, tile_w + k - 1) + kOutGroup * kInChunk * k * k);
  auto kernel = forward_kernel<T>;
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  kernel<<<dim3(static_cast<unsigned int>(blocks), static_cast<unsigned int>(groups)), dim3(tile_w, tile_h),
           shared_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
__global__ void logdet_kernel(const T* weight, int64_t C, int k, double pixels, T* out) {
  __shared__ double partial[256];
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    sum += log(fabs(static_cast<double>(weight[weight_offset(c, c, k - 1, k - 1, C, k)])));
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(pixels * partial[0]);
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
    logdet_kernel<scalar_t><<<1, 256, 0, stream>>>(w.data_ptr<scalar_t>(), w.size(0), static_cast<int>(w.size(3)),
                                                  static_cast<double>(height) * static_cast<double>(width),
                                                  out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace cinc
