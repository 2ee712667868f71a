// The CUDA wavefront kernels (inverse and inverse_transpose, docs/spec.md §1) and their launch plan.
//
// Nothing here needs ATen: cinc_cuda_wavefront.cu (nvcc) adds the torch glue and launches them, and
// tests/cuda_emulation/ compiles this same file with the host compiler and runs every CUDA thread of a block (of a
// cluster) as a CPU thread (real barriers, NaN-filled shared memory, distributed shared memory, ThreadSanitizer,
// bank-conflict counts), so the kernels that CI checks are the ones the GPU runs. The steps, the arithmetic and the
// buffers are described in cinc_wavefront_block.h; the performance model is docs/gpu-performance.md.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cinc_wavefront_block.h"

namespace cinc {
namespace cuda {

// The most threads a wavefront block may have. 512 float32 threads leave ptxas 128 registers each for the 4 × 4
// accumulators, their inputs and the prefetched right-hand side; float64 needs twice the registers for the same
// blocks, hence 384 (168 registers). tools/cuda_ptxas.py records registers and spills of every specialisation.
template <typename T>
constexpr int kWavefrontMaxThreads = sizeof(T) == 8 ? 384 : 512;

// What a cluster step (the last distributed-shared-memory store landing, then barrier.cluster) costs beyond a
// __syncthreads(), in multiply-adds of one SM: ~420 clocks at ~111 per clock (docs/gpu-performance.md, an estimate).
constexpr int64_t kClusterStepFma = 48000;

// Right-hand-side values a thread loads for the next diagonal before the hot loop (registers held across it).
template <typename T>
constexpr int kPrefetch = sizeof(T) == 8 ? 4 : 8;

// Grid (k², coefficient_chunks); block kCoefficientThreads. Each block builds L⁻¹ in shared memory (one thread per
// column: the forward substitution is sequential down a column) and writes its share of one tap's coefficients.
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kCoefficientThreads)
    wavefront_coefficients_kernel(const T* weight, int64_t C, int k, bool unit_diagonal, int padded,
                                  T* coefficients) {
  // The wavefront kernel may start now: it waits for this grid before it reads the coefficients.
  allow_dependent_launch();
  T* centre = reinterpret_cast<T*>(block_shared_memory());
  const int64_t stride = odd_stride(C);
  T* inverse = centre + C * stride;
  const int tid = threadIdx.x, threads = blockDim.x;
  // C² fits in shared memory, so 32-bit division (64-bit division is a slow subroutine on the GPU).
  for (int e = tid; e < C * C; e += threads) {
    const int r = e / static_cast<int>(C), c = e % static_cast<int>(C);
    centre[r * stride + c] = masked_weight(weight, r, c, k - 1, k - 1, C, k, unit_diagonal);
    inverse[r * stride + c] = r == c ? T(1) : T(0);
  }
  __syncthreads();
  for (int64_t col = tid; col < C; col += threads) solve_lower_column(centre, inverse, stride, C, col);
  __syncthreads();
  const int tap = blockIdx.x;
  const int entries = padded * padded;
  T* out = coefficients + static_cast<int64_t>(tap) * entries;
  for (int e = blockIdx.y * threads + tid; e < entries; e += gridDim.y * threads) {
    out[e] = wavefront_coefficient<T, kAdjoint>(weight, inverse, stride, C, k, padded, tap, e);
  }
}

// One image per block (kCluster false) or per cluster of p.blocks_per_image blocks, which own disjoint output
// channels and exchange each diagonal's solution through distributed shared memory.
template <typename T, bool kAdjoint, bool kRingShared, bool kWeightsShared, bool kCluster>
__global__ void __launch_bounds__(kWavefrontMaxThreads<T>) wavefront_kernel(const WavefrontParams<T> p) {
  const int tid = threadIdx.x, threads = blockDim.x;
  const int blocks = kCluster ? p.blocks_per_image : 1;
  const int64_t image = blockIdx.x / blocks;
  const int rank = static_cast<int>(blockIdx.x % blocks);
  unsigned char* shared = block_shared_memory();
  const WavefrontBlock<T> b = wavefront_block<T, kRingShared, kWeightsShared>(p, shared, image, rank);
  const int C = static_cast<int>(p.C);
  const int64_t steps = p.H + p.W - 1;

  const int64_t ring_vectors = p.ring_elements / kVec<T>;
  for (int64_t e = tid; e < ring_vectors; e += threads) wavefront_zero_ring(b, e);
  __syncthreads();
  {
    const DiagonalSpan first = wavefront_diagonal(p, 0, kAdjoint);
    const int staged = first.count * C;
    for (int e = tid; e < staged; e += threads) {
      stage_value(p, b, first, 0, e, staged_value<T, kAdjoint>(p, image, first, e));
    }
  }
  // The right-hand side of step s + 1 is loaded into registers during phase B of step s - 1 (here, for s = 0) and
  // stored to its staging slot at the end of phase A of step s: its latency hides behind a barrier and a hot loop.
  T prefetched[kPrefetch<T>];
  const auto prefetch = [&](int64_t to) {
    const DiagonalSpan next = wavefront_diagonal(p, to < steps ? to : steps - 1, kAdjoint);
    const int next_items = to < steps ? next.count * C : 0;
    CINC_UNROLL
    for (int r = 0; r < kPrefetch<T>; ++r) {
      const int e = tid + r * threads;
      prefetched[r] = e < next_items ? staged_value<T, kAdjoint>(p, image, next, e) : T(0);
    }
  };
  prefetch(1);
  // All of the above overlaps the coefficient kernel (launched before this one in the stream, with programmatic
  // dependent launch on sm_90); the coefficients are read from here on.
  wait_for_prerequisites();
  if (kWeightsShared) {
    T* weights = reinterpret_cast<T*>(shared) + p.partial_elements + p.ring_elements;
    const int64_t copies = weight_copy_items(p);
    for (int64_t e = tid; e < copies; e += threads) wavefront_copy_weights(p, b, weights, e);
  }
  // In a cluster, also: every block has started and zeroed its ring before any other block writes into it.
  if constexpr (kCluster) {
    cluster_barrier();
  } else {
    __syncthreads();
  }

  for (int64_t step = 0; step < steps; ++step) {
    const DiagonalSpan span = wavefront_diagonal(p, step, kAdjoint);

    // Phase A. The previous diagonal's finished groups to the output (its values are in the ring since the barrier).
    if (step > 0) {
      const DiagonalSpan previous = wavefront_diagonal(p, step - 1, kAdjoint);
      const StoreRows rows = wavefront_store_rows<T, kAdjoint>(p, previous);
      const int items = (rows.regular + rows.edge) * b.owned;
      for (int e = tid; e < items; e += threads) wavefront_store_group(p, b, previous, rows, e);
    }
    const DiagonalWork work = diagonal_work<T>(span.count, b.groups, threads, p.k, p.padded_channels);
    const int items = work.splits * work.items;
    for (int e = tid; e < items; e += threads) wavefront_partial_sums<T, kAdjoint>(p, b, span, step, work, e);
    // The next diagonal's right-hand side to its staging slot (what did not fit in the registers: loaded now).
    const bool has_next = step + 1 < steps;
    const DiagonalSpan next = wavefront_diagonal(p, has_next ? step + 1 : step, kAdjoint);
    const int next_items = has_next ? next.count * C : 0;
    CINC_UNROLL
    for (int r = 0; r < kPrefetch<T>; ++r) {
      const int e = tid + r * threads;
      if (e < next_items) stage_value(p, b, next, step + 1, e, prefetched[r]);
    }
    for (int e = tid + kPrefetch<T> * threads; e < next_items; e += threads) {
      stage_value(p, b, next, step + 1, e, staged_value<T, kAdjoint>(p, image, next, e));
    }
    __syncthreads();

    // Phase B: this block's channels of the diagonal, into its ring and every other ring of the cluster; the guard
    // rows of the diagonal in this block's ring.
    const int64_t guards = guard_items(p);
    for (int64_t e = tid; e < guards; e += threads) wavefront_zero_guard(p, b, span, e);
    const int vectors = span.count * (b.groups * kChannelBlock / kVec<T>);
    for (int e = tid; e < vectors; e += threads) {
      const SolvedVector<T> solved = wavefront_reduce(p, b, span, work, e);
      Vec<T>* own = reinterpret_cast<Vec<T>*>(b.ring + solved.ring_offset);
      st(own, solved.value);
      if constexpr (kCluster) {
        for (int peer = 1; peer < blocks; ++peer) {
          st(cluster_peer(own, static_cast<unsigned int>((rank + peer) % blocks)), solved.value);
        }
      }
    }
    prefetch(step + 2);
    if constexpr (kCluster) {
      cluster_barrier();
    } else {
      __syncthreads();
    }
  }

  const DiagonalSpan last = wavefront_diagonal(p, steps - 1, kAdjoint);
  const StoreRows rows = wavefront_store_rows<T, kAdjoint>(p, last);
  const int items = (rows.regular + rows.edge) * b.owned;
  for (int e = tid; e < items; e += threads) wavefront_store_group(p, b, last, rows, e);
}

// Fills the derived fields of `p` (which must already hold C, H, W, k) and returns the launch plan for `batch` images
// on `device`. `forced_threads` / `forced_blocks` > 0 (CINC_CUDA_WAVEFRONT_THREADS / _BLOCKS, for the sweeps of the
// GPU benchmark) override the choices; they are rounded to what the kernel can run.
//
// Choices, in order (docs/gpu-performance.md derives them):
//  * blocks per image: when the batch leaves SMs idle and the device has clusters, enough blocks to fill them
//    (≤ device.max_cluster), each owning an equal share of the output-channel groups — unless an image's diagonals
//    have too little work for the cluster barrier to pay (kClusterStepFma);
//  * threads: a whole number of warps — at least 6 per SM, at most kWavefrontMaxThreads (256 when an SM is to hold
//    two blocks, i.e. there are more blocks than SMs) — that keeps the most threads busy in the hot loop over the
//    image's diagonals (within 2 % of the best, the most threads), among the counts whose partial sums leave room for
//    the ring in shared memory; without one, the ring's rows are packed tighter (conflict_free_stride), then — a
//    cluster needs the ring in shared memory: its blocks write into each other's rings — the image gets one block,
//    and its ring goes to global memory if it still does not fit;
//  * the coefficient copy in shared memory when it fits, unless it is what keeps a second block off an SM that is
//    to hold two.
template <typename T>
WavefrontPlan plan_wavefront(WavefrontParams<T>& p, int64_t batch, const WavefrontDevice& device, int forced_threads,
                             int forced_blocks) {
  const int64_t elem = sizeof(T);
  p.padded_channels = static_cast<int>(round_up(p.C, kChannelBlock));
  p.groups_total = p.padded_channels / kChannelBlock;
  p.ring_slots = ring_slots_for(p.k);
  p.ring_rows = static_cast<int>(p.H + 2 * (p.k - 1) + kPixelBlock - 1);
  const auto ring_stride = [&](bool tight) {
    p.ring_stride = conflict_free_stride<T>(p.padded_channels, tight);
    p.ring_elements = static_cast<int64_t>(p.ring_slots + 2) * p.ring_rows * p.ring_stride;
  };
  ring_stride(false);
  p.max_diagonal = static_cast<int>(std::min(p.H, p.W));
  const int64_t limit = device.shared_per_block / elem;

  WavefrontPlan plan{};
  const int64_t coefficient_elements = 2 * p.C * odd_stride(p.C);
  plan.coefficient_shared_bytes = coefficient_elements * elem;
  const int64_t entries = static_cast<int64_t>(p.padded_channels) * p.padded_channels;
  plan.coefficient_chunks =
      static_cast<int>((entries + kCoefficientThreads * kCoefficientEntriesPerThread - 1) /
                       (kCoefficientThreads * kCoefficientEntriesPerThread));
  plan.coefficient_elements = static_cast<int64_t>(p.k) * p.k * entries;

  int blocks = 1;
  if (device.max_cluster > 1) {
    const int64_t want = forced_blocks > 0 ? forced_blocks : device.multiprocessors / std::max<int64_t>(batch, 1);
    blocks = static_cast<int>(std::clamp<int64_t>(want, 1, std::min(device.max_cluster, p.groups_total)));
    // A cluster step costs about kClusterStepFma multiply-adds of one SM more than a block's: worth it only when the
    // work it takes off each block (of an average diagonal, half the longest) saves more than that.
    const int64_t longest = static_cast<int64_t>(p.max_diagonal) * p.C * p.k * p.k * p.C;
    if (forced_blocks <= 0 && longest / 2 - longest / 2 / blocks < kClusterStepFma) blocks = 1;
  }
  const auto split_groups = [&](int g) {
    p.groups_per_block = (p.groups_total + g - 1) / g;
    p.blocks_per_image = (p.groups_total + p.groups_per_block - 1) / p.groups_per_block;
    p.weight_stride = p.groups_per_block * kChannelBlock;
    p.weight_chunk_stride = weight_chunk_stride_for<T>(p.weight_stride, p.groups_per_block);
    p.weight_elements = static_cast<int64_t>(p.k) * p.k * (p.padded_channels / kVec<T>) * p.weight_chunk_stride;
  };
  // The last block of an image may own fewer groups, so more slices: size for both.
  const auto partial_for = [&](int threads) {
    const int last = p.groups_total - (p.blocks_per_image - 1) * p.groups_per_block;
    return std::max(partial_elements_for<T>(p.max_diagonal, p.groups_per_block, threads, p.k, p.padded_channels),
                    partial_elements_for<T>(p.max_diagonal, last, threads, p.k, p.padded_channels));
  };
  // The thread count for the current split of the groups, or 0 when none fits (ring in shared memory or not).
  const auto choose_threads = [&](bool two_per_sm, bool ring_in_shared) {
    const int most = two_per_sm ? std::min(256, kWavefrontMaxThreads<T>) : kWavefrontMaxThreads<T>;
    const int64_t items = static_cast<int64_t>((p.max_diagonal + kPixelBlock - 1) / kPixelBlock) * p.groups_per_block;
    const int64_t chunks = static_cast<int64_t>(p.k) * p.k * (p.padded_channels / kVec<T>);
    int least = static_cast<int>(std::min<int64_t>(two_per_sm ? 128 : 192, round_up(items * chunks, 32)));
    int highest = most;
    if (forced_threads > 0) least = highest = std::min(kWavefrontMaxThreads<T>, std::max(32, forced_threads / 32 * 32));
    double utilisation[kWavefrontMaxThreads<T> / 32 + 1] = {};
    double best = -1;
    for (int t = least; t <= highest; t += 32) {
      const int64_t need = partial_for(t) + (ring_in_shared ? p.ring_elements : 0);
      utilisation[t / 32] =
          need <= limit ? hot_loop_utilisation<T>(p.H, p.W, p.groups_per_block, t, p.k, p.padded_channels) : -1;
      best = std::max(best, utilisation[t / 32]);
    }
    int threads = 0;
    for (int t = least; t <= highest; t += 32) {
      if (utilisation[t / 32] >= 0 && utilisation[t / 32] >= best - 0.02) threads = t;
    }
    return threads;
  };

  // Where the ring does not fit, first a tighter stride (a few more bank conflicts), then one block per image.
  split_groups(blocks);
  for (bool tight = false;;) {
    const bool two_per_sm = batch * p.blocks_per_image > device.multiprocessors;
    plan.threads = choose_threads(two_per_sm, true);
    plan.ring_in_shared = plan.threads > 0;
    if (plan.ring_in_shared) break;
    if (!tight) {
      ring_stride(tight = true);
    } else if (p.blocks_per_image > 1) {
      split_groups(1);
    } else {
      break;
    }
  }
  const bool two_per_sm = batch * p.blocks_per_image > device.multiprocessors;
  if (!plan.ring_in_shared) plan.threads = choose_threads(two_per_sm, false);
  plan.fits = plan.threads > 0 && coefficient_elements <= limit;
  if (plan.threads == 0) plan.threads = 32;
  p.partial_elements = partial_for(plan.threads);
  plan.blocks_per_image = p.blocks_per_image;
  const int64_t without = p.partial_elements + (plan.ring_in_shared ? p.ring_elements : 0);
  const int64_t with = without + p.weight_elements;
  // Each block also holds 1 KB of shared memory reserved by the system.
  const auto fit_two = [&](int64_t elements) { return 2 * (elements * elem + 1024) <= device.shared_per_multiprocessor; };
  const bool blocks_second = two_per_sm && !fit_two(with) && fit_two(without);
  plan.weights_in_shared = plan.ring_in_shared && with <= limit && !blocks_second;
  plan.shared_bytes = (plan.weights_in_shared ? with : without) * elem;
  plan.ring_global_elements = plan.ring_in_shared ? 0 : p.ring_elements;
  return plan;
}

}  // namespace cuda
}  // namespace cinc
