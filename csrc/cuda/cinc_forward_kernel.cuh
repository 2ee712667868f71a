// The CUDA forward y = M x + bias and log-determinant kernels (docs/spec.md §1) and their launch configuration.
//
// Nothing here needs ATen: cinc_cuda_forward.cu (nvcc) adds the torch glue and launches them, and
// tests/cuda_emulation/ compiles this same file with the host compiler and runs every CUDA thread of a block as a CPU
// thread (a real barrier for __syncthreads(), NaN-filled shared memory, ThreadSanitizer).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../cinc_math.h"

namespace cinc {
namespace cuda {

constexpr int kOutGroup = 8;
constexpr int kInChunk = 8;
constexpr int kMaxTileThreads = 256;

static_assert(kOutGroup == 8, "the float32 path of forward_kernel loads a tap's weights as two float4");

// The input tile's size in elements, rounded up so the weight tile after it starts 16-byte aligned.
CINC_HD int x_tile_elements(int halo_h, int halo_w) {
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

// Blocks of 256 threads per SM that ptxas must leave registers for. Left to itself ptxas gave the float64 kernel 64
// registers and spilled (sm_80, nvcc 13.0); 3 blocks allow 85, which it fits in without spilling. The others get
// about what ptxas took by itself: float32 58-64 registers (4 blocks: 64), float16/bfloat16 32-40 (5 blocks: 51;
// 6 blocks' 42 spilled on sm_80). benchmarks/cuda_ptxas.py records the outcome.
template <typename T>
constexpr int kForwardMinBlocks = sizeof(T) == 8 ? 3 : sizeof(T) == 4 ? 4 : 5;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kMaxTileThreads, kForwardMinBlocks<T>) forward_kernel(const ForwardParams<T> p) {
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
CINC_UNROLL
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
CINC_UNROLL
            for (int g = 0; g < kOutGroup; ++g) acc[g] += wp[g] * xv;
          }
        }
      }
    }
    __syncthreads();
  }

  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  if (i >= H || j >= W) return;
CINC_UNROLL
  for (int g = 0; g < kOutGroup; ++g) {
    const int64_t o = o0 + g;
    if (o < C) {
      const Acc bias = p.bias != nullptr ? static_cast<Acc>(p.bias[o]) : Acc(0);
      p.y[((b * C + o) * H + i) * W + j] = static_cast<T>(acc[g] + bias);
    }
  }
}

inline int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n && p < (1 << 20)) p <<= 1;
  return p;
}

// Grid, block and dynamic shared memory of one forward launch.
struct ForwardLaunch {
  int64_t blocks;  // grid.x: B · tiles_per_image
  int64_t groups;  // grid.y: output-channel groups of kOutGroup
  int tile_w, tile_h;
  size_t shared_bytes;
};

// Fills p.tiles_w and p.tiles_per_image (p must already hold C, H, W, k) and returns the launch for a batch of B.
// The caller refuses shapes whose tile, block or group counts exceed the grid's limits (tiles_h · tiles_w ≤ 2^31-1,
// blocks ≤ 2^31-1, groups ≤ 65535).
template <typename T, typename Acc>
ForwardLaunch configure_forward(ForwardParams<T>& p, int64_t B, int64_t* tiles_h) {
  ForwardLaunch l;
  // Tile: up to 32 columns wide (coalesced rows), kMaxTileThreads pixels, never much larger than the image.
  l.tile_w = std::min(32, next_power_of_two(p.W));
  l.tile_h = std::min(next_power_of_two(p.H), kMaxTileThreads / l.tile_w);
  p.tiles_w = static_cast<int>((p.W + l.tile_w - 1) / l.tile_w);
  *tiles_h = (p.H + l.tile_h - 1) / l.tile_h;
  p.tiles_per_image = static_cast<int>(*tiles_h * p.tiles_w);
  l.blocks = B * p.tiles_per_image;
  l.groups = (p.C + kOutGroup - 1) / kOutGroup;
  l.shared_bytes = sizeof(Acc) * (x_tile_elements(l.tile_h + p.k - 1, l.tile_w + p.k - 1) +
                                  static_cast<size_t>(kOutGroup) * kInChunk * p.k * p.k);
  return l;
}

// Log-determinant: one block of kLogdetThreads sums log|L[c, c]| in float64 (a tree reduction in shared memory) and
// writes H·W times it: no host sync, -inf for a zero on the diagonal (as the CPU kernel).
constexpr int kLogdetThreads = 256;
constexpr size_t kLogdetSharedBytes = kLogdetThreads * sizeof(double);

template <typename T>
__global__ void __launch_bounds__(kLogdetThreads) logdet_kernel(const T* weight, int64_t C, int k, double pixels,
                                                                 T* out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  double* partial = reinterpret_cast<double*>(shared_bytes);  // [blockDim.x]
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    sum += log(fabs(static_cast<double>(weight[weight_offset(c, c, k - 1, k - 1, C, k)])));
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(pixels * partial[0]);
}

}  // namespace cuda
}  // namespace cinc
