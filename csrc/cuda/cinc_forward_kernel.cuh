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
// The k = 3 path stages at most this many pixels of the input tile (halo included) per thread and channel.
constexpr int kHaloSlots = 2;

static_assert(kOutGroup == 8, "accumulate_tap loads a tap's float32 weights as two float4");

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
  int tiles_w;          // tiles per image row
  int tiles_per_image;
  bool k3_pipeline;     // run forward_tile_k3 (configure_forward decides)
};

// Blocks of 256 threads per SM that ptxas must leave registers for: the most that still hold the k = 3 path's
// accumulators and next chunk without spilling on sm_80 and sm_90 (float16/bfloat16 convert while staging and need
// more than float32). The registers and spills of every specialisation are in tools/results/cuda_ptxas.csv
// (tools/cuda_ptxas.py).
template <typename T>
constexpr int kForwardMinBlocks = sizeof(T) == 8 ? 2 : sizeof(T) == 4 ? 4 : 3;

template <typename T, typename Acc>
__device__ __forceinline__ void forward_tile_any_k(const ForwardParams<T>& p, Acc* shared);
template <typename T, typename Acc>
__device__ __forceinline__ void forward_tile_k3(const ForwardParams<T>& p, Acc* shared);

// A block computes a tile of output pixels of one image (one thread per pixel) for kOutGroup output channels,
// walking the input channels in chunks of kInChunk staged in shared memory. grid.x: image × tile, grid.y: output
// group. k = 3 on tiles that are not tiny takes the specialised path; the branch is the same for the whole launch.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kMaxTileThreads, kForwardMinBlocks<T>) forward_kernel(const ForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Acc* shared = reinterpret_cast<Acc*>(shared_bytes);
  if (p.k3_pipeline) {
    forward_tile_k3<T, Acc>(p, shared);
  } else {
    forward_tile_any_k<T, Acc>(p, shared);
  }
}

// Where a block's tile is: image b, top-left output pixel (i0, j0), first output channel o0.
struct ForwardTile {
  int64_t b, i0, j0, o0;
};

template <typename T>
CINC_HD ForwardTile tile_origin(const ForwardParams<T>& p, unsigned int block, unsigned int group, int tile_h,
                                 int tile_w) {
  const int tile = static_cast<int>(block % static_cast<unsigned int>(p.tiles_per_image));
  return ForwardTile{static_cast<int64_t>(block / static_cast<unsigned int>(p.tiles_per_image)),
                     static_cast<int64_t>(tile / p.tiles_w) * tile_h, static_cast<int64_t>(tile % p.tiles_w) * tile_w,
                     static_cast<int64_t>(group) * kOutGroup};
}

// acc[g] += w[g] · xv over the kOutGroup output channels of one tap. `w` is the same address for every thread of the
// block (a broadcast) and 16-byte aligned: float32 reads it as two float4, 2 shared-memory loads for 8 multiply-adds.
template <typename Acc>
CINC_HD void accumulate_tap(Acc (&acc)[kOutGroup], const Acc* w, Acc xv) {
  if constexpr (std::is_same<Acc, float>::value) {
    const float4 lo = *reinterpret_cast<const float4*>(w);
    const float4 hi = *reinterpret_cast<const float4*>(w + 4);
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
    for (int g = 0; g < kOutGroup; ++g) acc[g] += w[g] * xv;
  }
}

// y at this thread's pixel for the block's output channels (threads on pixels past the image's edge store nothing).
template <typename T, typename Acc>
CINC_HD void store_outputs(const ForwardParams<T>& p, const ForwardTile& t, const Acc (&acc)[kOutGroup], int ty,
                           int tx) {
  const int64_t i = t.i0 + ty, j = t.j0 + tx;
  if (i >= p.H || j >= p.W) return;
CINC_UNROLL
  for (int g = 0; g < kOutGroup; ++g) {
    const int64_t o = t.o0 + g;
    if (o < p.C) {
      const Acc bias = p.bias != nullptr ? static_cast<Acc>(p.bias[o]) : Acc(0);
      p.y[((t.b * p.C + o) * p.H + i) * p.W + j] = static_cast<T>(acc[g] + bias);
    }
  }
}

// Any k: per chunk, stage the input tile (with its k-1 halo above and to the left, zeros outside the image) and the
// matching masked weights, then sum.
template <typename T, typename Acc>
__device__ __forceinline__ void forward_tile_any_k(const ForwardParams<T>& p, Acc* shared) {
  const int k = p.k;
  const int tile_w = blockDim.x, tile_h = blockDim.y;
  const int halo_w = tile_w + k - 1, halo_h = tile_h + k - 1;
  Acc* x_tile = shared;  // [kInChunk][halo_h][halo_w]
  // [kInChunk][k·k][kOutGroup], 16-byte aligned for accumulate_tap.
  Acc* w_tile = x_tile + x_tile_elements(halo_h, halo_w);

  const ForwardTile t = tile_origin(p, blockIdx.x, blockIdx.y, tile_h, tile_w);
  const int tid = threadIdx.y * tile_w + threadIdx.x, threads = tile_w * tile_h;
  const int64_t C = p.C, H = p.H, W = p.W;
  const T* x = p.x + t.b * p.x_stride_b;

  Acc acc[kOutGroup];
CINC_UNROLL
  for (int g = 0; g < kOutGroup; ++g) acc[g] = Acc(0);

  for (int64_t c0 = 0; c0 < C; c0 += kInChunk) {
    const int chunk = static_cast<int>(std::min<int64_t>(kInChunk, C - c0));
    // Row r of the halo is image row i0 + r - (k-1); outside the image (the padding) reads as 0.
    for (int e = tid; e < chunk * halo_h * halo_w; e += threads) {
      const int cc = e / (halo_h * halo_w), r = (e / halo_w) % halo_h, s = e % halo_w;
      const int64_t ii = t.i0 + r - (k - 1), jj = t.j0 + s - (k - 1);
      Acc v = Acc(0);
      if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
        v = static_cast<Acc>(x[(c0 + cc) * p.x_stride_c + ii * p.x_stride_h + jj * p.x_stride_w]);
      }
      x_tile[e] = v;
    }
    for (int e = tid; e < kOutGroup * kInChunk * k * k; e += threads) {
      const int g = e % kOutGroup, tap = (e / kOutGroup) % (k * k), cc = e / (kOutGroup * k * k);
      const int64_t o = t.o0 + g, c = c0 + cc;
      w_tile[e] = (o < C && c < C)
                      ? static_cast<Acc>(masked_weight(p.weight, o, c, tap / k, tap % k, C, k, p.unit_diagonal))
                      : Acc(0);
    }
    __syncthreads();
    for (int cc = 0; cc < chunk; ++cc) {
      for (int a = 0; a < k; ++a) {
        for (int bb = 0; bb < k; ++bb) {
          const Acc xv = x_tile[(cc * halo_h + threadIdx.y + a) * halo_w + threadIdx.x + bb];
          accumulate_tap(acc, w_tile + ((cc * k + a) * k + bb) * kOutGroup, xv);
        }
      }
    }
    __syncthreads();
  }
  store_outputs(p, t, acc, threadIdx.y, threadIdx.x);
}

// k = 3, the flows' kernel size: the tiles and chunks of forward_tile_any_k, with three differences.
// * Fixed indices. A thread stages the same kHaloSlots pixels of the tile's halo plane in every channel of every
//   chunk, so where they are in x is worked out once (one division each) instead of per staged element; the tap loop
//   is unrolled with compile-time offsets and the weight tile's indices divide by constants.
// * Double-buffered chunks. Two buffers of (input tile, weights): while chunk n is summed from one, chunk n+1's input
//   is on its way from global memory into registers and its weights go into the other, so the loads' latency
//   overlaps the arithmetic and one barrier per chunk suffices (the other buffer was last read before the previous
//   barrier).
// * Only tiles whose halo plane fits in kHaloSlots pixels per thread take it (configure_forward), which bounds the
//   registers that hold the next chunk.
template <typename T, typename Acc>
__device__ __forceinline__ void forward_tile_k3(const ForwardParams<T>& p, Acc* shared) {
  constexpr int K = 3, kTaps = K * K, kWeightTile = kOutGroup * kInChunk * kTaps;
  const int tile_w = blockDim.x, tile_h = blockDim.y;
  const int halo_w = tile_w + K - 1, plane = (tile_h + K - 1) * halo_w;
  // Buffer n % 2 holds chunk n: the input tile [kInChunk][halo_h][halo_w], then the weights [kInChunk][k·k][kOutGroup]
  // (16-byte aligned for accumulate_tap).
  const int x_elements = x_tile_elements(tile_h + K - 1, halo_w), buffer = x_elements + kWeightTile;

  const ForwardTile t = tile_origin(p, blockIdx.x, blockIdx.y, tile_h, tile_w);
  const int tid = threadIdx.y * tile_w + threadIdx.x, threads = tile_w * tile_h;
  const int64_t C = p.C, H = p.H, W = p.W;
  const T* x = p.x + t.b * p.x_stride_b;

  int64_t offset[kHaloSlots];  // of the slot's pixel within a channel of x
  bool inside[kHaloSlots];     // the pixel is in the image (else it is padding: 0)
  bool staged[kHaloSlots];     // the slot is a pixel of the halo plane (the last threads have fewer)
CINC_UNROLL
  for (int s = 0; s < kHaloSlots; ++s) {
    const int e = tid + s * threads;
    const int r = e / halo_w, col = e - r * halo_w;
    const int64_t ii = t.i0 + r - (K - 1), jj = t.j0 + col - (K - 1);
    staged[s] = e < plane;
    inside[s] = staged[s] && ii >= 0 && ii < H && jj >= 0 && jj < W;
    offset[s] = inside[s] ? ii * p.x_stride_h + jj * p.x_stride_w : 0;
  }

  T next[kInChunk][kHaloSlots];  // the next chunk's input, between its load and its store
  const auto load_input = [&](int64_t c0, int chunk) {
CINC_UNROLL
    for (int cc = 0; cc < kInChunk; ++cc) {
      const T* channel = x + (c0 + cc) * p.x_stride_c;
CINC_UNROLL
      for (int s = 0; s < kHaloSlots; ++s) {
        next[cc][s] = (cc < chunk && inside[s]) ? channel[offset[s]] : T(0);
      }
    }
  };
  const auto store_input = [&](Acc* x_tile, int chunk) {
CINC_UNROLL
    for (int cc = 0; cc < kInChunk; ++cc) {
CINC_UNROLL
      for (int s = 0; s < kHaloSlots; ++s) {
        if (cc < chunk && staged[s]) x_tile[cc * plane + tid + s * threads] = static_cast<Acc>(next[cc][s]);
      }
    }
  };
  const auto stage_weights = [&](Acc* w_tile, int64_t c0) {
    for (int e = tid; e < kWeightTile; e += threads) {
      const int g = e % kOutGroup, tap = (e / kOutGroup) % kTaps, cc = e / (kOutGroup * kTaps);
      const int64_t o = t.o0 + g, c = c0 + cc;
      w_tile[e] = (o < C && c < C)
                      ? static_cast<Acc>(masked_weight(p.weight, o, c, tap / K, tap % K, C, K, p.unit_diagonal))
                      : Acc(0);
    }
  };
  const auto chunk_size = [&](int64_t n) { return static_cast<int>(std::min<int64_t>(kInChunk, C - n * kInChunk)); };

  Acc acc[kOutGroup];
CINC_UNROLL
  for (int g = 0; g < kOutGroup; ++g) acc[g] = Acc(0);

  const int64_t chunks = (C + kInChunk - 1) / kInChunk;
  load_input(0, chunk_size(0));
  store_input(shared, chunk_size(0));
  stage_weights(shared + x_elements, 0);
  __syncthreads();
  for (int64_t n = 0; n < chunks; ++n) {
    const Acc* x_tile = shared + (n % 2) * buffer;
    const Acc* w_tile = x_tile + x_elements;
    Acc* spare = shared + ((n + 1) % 2) * buffer;
    const bool more = n + 1 < chunks;
    if (more) {
      load_input((n + 1) * kInChunk, chunk_size(n + 1));
      stage_weights(spare + x_elements, (n + 1) * kInChunk);
    }
    const int chunk = chunk_size(n);
    for (int cc = 0; cc < chunk; ++cc) {
      const Acc* xr = x_tile + cc * plane + threadIdx.y * halo_w + threadIdx.x;
      const Acc* wr = w_tile + cc * kTaps * kOutGroup;
CINC_UNROLL
      for (int a = 0; a < K; ++a) {
CINC_UNROLL
        for (int bb = 0; bb < K; ++bb) accumulate_tap(acc, wr + (a * K + bb) * kOutGroup, xr[a * halo_w + bb]);
      }
    }
    if (more) {
      store_input(spare, chunk_size(n + 1));
      __syncthreads();
    }
  }
  store_outputs(p, t, acc, threadIdx.y, threadIdx.x);
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

// Fills p.tiles_w, p.tiles_per_image and p.k3_pipeline (p must already hold C, H, W, k) and returns the launch for a
// batch of B. The caller refuses shapes whose tile, block or group counts exceed the grid's limits
// (tiles_h · tiles_w ≤ 2^31-1, blocks ≤ 2^31-1, groups ≤ 65535).
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
  // k = 3 takes the double-buffered path on tiles of 4 × 8 pixels and more (32×8, 16×16, 8×8, 8×4, ...); thin or
  // tiny tiles, whose halo is most of their input, keep the general one.
  const int halo_pixels = (l.tile_h + p.k - 1) * (l.tile_w + p.k - 1);
  p.k3_pipeline = p.k == 3 && halo_pixels <= kHaloSlots * l.tile_h * l.tile_w;
  l.shared_bytes = (p.k3_pipeline ? 2 : 1) * sizeof(Acc) *
                   (x_tile_elements(l.tile_h + p.k - 1, l.tile_w + p.k - 1) +
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
