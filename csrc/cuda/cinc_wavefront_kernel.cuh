// The CUDA wavefront kernel (inverse and inverse_transpose, docs/spec.md §1) and its launch configuration.
//
// Nothing here needs ATen: cinc_cuda_wavefront.cu (nvcc) adds the torch glue and launches it, and
// tests/cuda_emulation/ compiles this same file with the host compiler and runs every CUDA thread of a block as a
// CPU thread (a real barrier for __syncthreads(), NaN-filled shared memory, ThreadSanitizer), so the kernel that CI
// checks is the one the GPU runs. The steps and the shared-memory layout are in cinc_wavefront_block.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cinc_wavefront_block.h"

namespace cinc {
namespace cuda {

// The most threads a block may have: 512 leave 128 registers per thread for the 4 × 4 register blocks of the residual
// step, enough in float32; float64's blocks take twice the registers, and at 128 ptxas spilled (4 bytes in
// <double, inverse, global>, sm_90, nvcc 13.0), so float64 blocks stop at 384 threads (168 registers).
// benchmarks/cuda_ptxas.py records registers and spills of every specialisation.
template <typename T>
constexpr int kWavefrontMaxThreads = sizeof(T) == 8 ? 384 : 512;

// One block per image; see cinc_cuda_wavefront.cu for the schedule.
template <typename T, bool kAdjoint, bool kRing>
__global__ void __launch_bounds__(kWavefrontMaxThreads<T>) wavefront_kernel(const WavefrontParams<T> p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const WavefrontShared<T> s(reinterpret_cast<T*>(shared_bytes), p);
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t image = blockIdx.x;

  const int64_t fill_items = wavefront_fill_items(p);
  for (int64_t e = tid; e < fill_items; e += threads) wavefront_prologue_fill(p, s, e);
  __syncthreads();
  for (int64_t col = tid; col < p.C; col += threads) wavefront_prologue_solve(p, s, col);
  __syncthreads();

  const int64_t diagonals = p.H + p.W - 1;
  for (int64_t step = 0; step < diagonals; ++step) {
    const DiagonalSpan span = wavefront_diagonal(p, step, kAdjoint);
    // items ≤ the residual buffer's C·min(H, W) elements, which fit in shared memory: int is wide enough.
    const int residual_items = wavefront_residual_items(span.count, p.C);
    for (int t = tid; t < residual_items; t += threads) wavefront_residual<T, kAdjoint, kRing>(p, s, image, span, t);
    __syncthreads();
    const int items = span.count * static_cast<int>(p.C);
    for (int t = tid; t < items; t += threads) wavefront_solve<T, kAdjoint, kRing>(p, s, image, span, t);
    __syncthreads();
  }
}

// Fills the derived fields of `p` (which must already hold C, H, W, k) for a GPU with `shared_limit_bytes` of shared
// memory per block and returns the layout; the caller refuses the call when !layout.fits.
template <typename T>
WavefrontLayout configure_wavefront(WavefrontParams<T>& p, int64_t shared_limit_bytes) {
  p.ring_slots = ring_slots_for(p.k);
  p.max_diagonal = std::min(p.H, p.W);
  const WavefrontLayout layout =
      wavefront_layout(p.C, p.H, p.W, p.k, shared_limit_bytes / static_cast<int64_t>(sizeof(T)));
  p.use_ring = layout.use_ring;
  p.work_elements = layout.work_elements;
  p.weight_in_shared = layout.weight_in_shared;
  return layout;
}

// Threads per block: one per residual block of the longest diagonal (or per 4 solve items, if more), up to
// kWavefrontMaxThreads<T> while the batch leaves SMs idle (one block per image: a batch of 1 uses one SM, so that
// block should be as wide as it can), up to 256 once every SM has two blocks. Unmeasured guesses (no GPU when
// written); `forced` > 0 (CINC_CUDA_WAVEFRONT_THREADS, for benchmarks/bench_gpu.py's sweep) overrides them, rounded
// down to whole warps and capped.
template <typename T>
int wavefront_threads(int64_t batch, int64_t C, int64_t max_diagonal, int multiprocessors, int forced) {
  constexpr int most = kWavefrontMaxThreads<T>;
  if (forced > 0) return std::min(most, std::max(32, forced / 32 * 32));
  const int64_t cap = batch >= 2 * static_cast<int64_t>(multiprocessors) ? 256 : most;
  const int64_t residual_items = wavefront_residual_items(static_cast<int>(max_diagonal), C);
  const int64_t wanted = (std::max(residual_items, max_diagonal * C / 4) + 31) / 32 * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min(cap, wanted)));
}

}  // namespace cuda
}  // namespace cinc
