// What one thread block of the CUDA wavefront does, as plain __host__ __device__ steps.
//
// The kernel (cinc_wavefront_kernel.cuh) runs these steps with its threads and a __syncthreads() between them
// (tests/cuda_emulation/ runs that kernel on CPU threads). Every step touches only the item it is given; items of one
// step are independent, which is why a barrier between steps is all the block needs.
//
// Block schedule for one image (inverse; the adjoint walks the diagonals in reverse):
//   prologue_fill(e)   for e < max(C², C²k²)       L's columns → work, identity → inverse_columns, weight copy
//   prologue_solve(c)  for c < C                   column c of L⁻¹ by solve_lower_in_place
//   for each diagonal d:
//     residual(t)      for t < residual_items      r = rhs - bias - tap sum over solved neighbours, 4 px × 4 ch
//     solve(t)         for t < count(d)·C          x = L⁻¹ r (adjoint: u = L⁻ᵀ r), to the output and the ring
#pragma once

#include <cstdint>

#include "../cinc_math.h"

namespace cinc {
namespace cuda {

// Every neighbour of a pixel on diagonal d lies on d-1 … d-2(k-1); diagonal d may take the slot of d-2(k-1)
// because it is written only after the barrier that ends the reads of its residual step. Hence 2(k-1) slots.
CINC_HD int ring_slots_for(int k) { return k > 1 ? 2 * (k - 1) : 1; }

// The last `slots` anti-diagonals of one image, stored [slot][channel][row] with slot = (i + j) mod slots: a
// diagonal's pixels are consecutive rows, so a warp's reads are consecutive words.
template <typename T>
struct DiagonalRing {
  T* data;
  int64_t C;
  int64_t H;
  int slots;
  CINC_HD int64_t offset(int64_t c, int64_t i, int64_t j) const {
    return (static_cast<int64_t>(static_cast<int>(i + j) % slots) * C + c) * H + i;
  }
  CINC_HD const T* pixel(int64_t i, int64_t j) const { return data + offset(0, i, j); }
  CINC_HD int64_t channel_stride() const { return H; }
};

template <typename T>
struct WavefrontParams {
  const T* rhs;  // y (inverse) or g (adjoint), any strides
  int64_t rhs_stride_b, rhs_stride_c, rhs_stride_h, rhs_stride_w;
  const T* bias;    // (C,) or nullptr
  const T* weight;  // (C, C, k, k), contiguous
  T* out;           // (B, C, H, W), contiguous
  int64_t C, H, W;
  int k;
  bool unit_diagonal;
  int ring_slots;        // ring_slots_for(k)
  int64_t max_diagonal;  // min(H, W): the longest anti-diagonal
  int64_t work_elements;
  bool use_ring;
  bool weight_in_shared;
};

// Shared memory of one block, in elements of T:
//   [ L⁻¹ columns: C² ][ work: max(C², ring + residual) ][ weight copy: C²k², when it fits ]
// The work region holds L's columns while L⁻¹ is built, then the ring of recent diagonals (when it fits; the
// output in global memory serves otherwise) followed by the residual of the current diagonal.
struct WavefrontLayout {
  bool fits;  // L⁻¹ and one diagonal's residual fit at all
  bool use_ring;
  bool weight_in_shared;
  int64_t work_elements;
  int64_t total_elements;
};

inline WavefrontLayout wavefront_layout(int64_t C, int64_t H, int64_t W, int k, int64_t limit_elements) {
  const int64_t max_diagonal = H < W ? H : W;
  const int64_t inverse = C * C, residual = C * max_diagonal, ring = ring_slots_for(k) * C * H;
  const int64_t weight = C * C * k * k;
  const auto work_for = [&](bool with_ring) {
    const int64_t need = (with_ring ? ring : 0) + residual;
    return need > C * C ? need : C * C;
  };
  WavefrontLayout l;
  l.use_ring = inverse + work_for(true) <= limit_elements;
  l.work_elements = work_for(l.use_ring);
  l.fits = inverse + l.work_elements <= limit_elements;
  l.weight_in_shared = inverse + l.work_elements + weight <= limit_elements;
  l.total_elements = inverse + l.work_elements + (l.weight_in_shared ? weight : 0);
  return l;
}

// Pointers into the block's shared memory.
template <typename T>
struct WavefrontShared {
  T* inverse_columns;
  T* work;
  T* weight_copy;
  CINC_HD WavefrontShared(T* base, const WavefrontParams<T>& p)
      : inverse_columns(base), work(base + p.C * p.C), weight_copy(base + p.C * p.C + p.work_elements) {}
  CINC_HD T* residual(const WavefrontParams<T>& p) const {
    return work + (p.use_ring ? p.ring_slots * p.C * p.H : 0);
  }
  CINC_HD DiagonalRing<T> ring(const WavefrontParams<T>& p) const { return {work, p.C, p.H, p.ring_slots}; }
  CINC_HD const T* weight(const WavefrontParams<T>& p) const { return p.weight_in_shared ? weight_copy : p.weight; }
};

// One entry of L⁻¹ r, where `inverse_columns` holds L⁻¹ column by column (inverse_columns[c·C + o] = L⁻¹[o, c],
// e.g. column c = solve_lower_in_place on the unit vector e_c) and r[c] is at r[c · r_stride]:
// returns Σ_{c ≤ o} L⁻¹[o, c] r[c]. With L⁻¹ precomputed the channel substitution of a pixel becomes C independent
// dot products, one per thread on a GPU, instead of C dependent steps.
template <typename Acc>
CINC_HD Acc lower_inverse_row_dot(const Acc* inverse_columns, const Acc* r, int64_t r_stride, int64_t C, int64_t o) {
  Acc sum = Acc(0);
  for (int64_t c = 0; c <= o; ++c) sum += inverse_columns[c * C + o] * r[c * r_stride];
  return sum;
}

// One entry of L⁻ᵀ r with the same storage: Σ_{o ≥ c} L⁻¹[o, c] r[o] (row c of L⁻ᵀ is column c of L⁻¹, contiguous).
template <typename Acc>
CINC_HD Acc lower_inverse_transpose_row_dot(const Acc* inverse_columns, const Acc* r, int64_t r_stride, int64_t C,
                                            int64_t c) {
  Acc sum = Acc(0);
  for (int64_t o = c; o < C; ++o) sum += inverse_columns[c * C + o] * r[o * r_stride];
  return sum;
}

// Number of prologue_fill items.
template <typename T>
CINC_HD int64_t wavefront_fill_items(const WavefrontParams<T>& p) {
  const int64_t squares = p.C * p.C, taps = p.weight_in_shared ? p.C * p.C * p.k * p.k : 0;
  return squares > taps ? squares : taps;
}

template <typename T>
CINC_HD void wavefront_prologue_fill(const WavefrontParams<T>& p, const WavefrontShared<T>& s, int64_t e) {
  const int64_t C = p.C;
  if (e < C * C) {
    // C² fits in shared memory, so 32-bit division (64-bit division is a slow subroutine call on the GPU).
    const int row = static_cast<int>(e) % static_cast<int>(C), col = static_cast<int>(e) / static_cast<int>(C);
    s.work[e] = masked_weight(p.weight, row, col, p.k - 1, p.k - 1, C, p.k, p.unit_diagonal);
    s.inverse_columns[e] = row == col ? T(1) : T(0);
  }
  if (p.weight_in_shared && e < C * C * p.k * p.k) s.weight_copy[e] = p.weight[e];
}

template <typename T>
CINC_HD void wavefront_prologue_solve(const WavefrontParams<T>& p, const WavefrontShared<T>& s, int64_t col) {
  solve_lower_in_place(s.work, s.inverse_columns + col * p.C, p.C);
}

// The pixels (first + n', d - first - n'), n' < count, of anti-diagonal d.
struct DiagonalSpan {
  int64_t d;
  int64_t first;
  int count;
};

template <typename T>
CINC_HD DiagonalSpan wavefront_diagonal(const WavefrontParams<T>& p, int64_t step, bool adjoint) {
  const int64_t d = adjoint ? p.H + p.W - 2 - step : step;
  const int64_t first = d - (p.W - 1) > 0 ? d - (p.W - 1) : 0;
  const int64_t last = d < p.H - 1 ? d : p.H - 1;
  return {d, first, static_cast<int>(last - first + 1)};
}

// The residual step works on blocks of kPixelBlock pixels × kChannelBlock channels per item (see
// causal_neighbour_block in cinc_math.h for why); the solve step on one (pixel, channel) per item.
constexpr int kPixelBlock = 4;
constexpr int kChannelBlock = 4;

CINC_HD int wavefront_residual_items(int count, int64_t C) {
  const int groups = (count + kPixelBlock - 1) / kPixelBlock;
  return groups * static_cast<int>((C + kChannelBlock - 1) / kChannelBlock);
}

// Item t < wavefront_residual_items: pixel group g = t mod groups holds the diagonal's pixels g, g + groups, …
// (so a warp's lanes take consecutive pixels), channel group t div groups (a warp shares it: weight reads are
// broadcasts).
template <typename T, bool kAdjoint, bool kRing>
CINC_HD void wavefront_residual(const WavefrontParams<T>& p, const WavefrontShared<T>& s, int64_t image,
                                DiagonalSpan span, int t) {
  const int groups = (span.count + kPixelBlock - 1) / kPixelBlock;
  const int g = t % groups;
  const int64_t ch0 = static_cast<int64_t>(t / groups) * kChannelBlock;
  const int64_t C = p.C, H = p.H, W = p.W;
  int64_t i[kPixelBlock], j[kPixelBlock];
  int pixels = 0;  // the block's pixels inside the diagonal are a prefix: g + n·groups grows with n
  CINC_UNROLL
  for (int n = 0; n < kPixelBlock; ++n) {
    const int pix = g + n * groups;
    if (pix < span.count) pixels = n + 1;
    i[n] = span.first + (pix < span.count ? pix : g);
    j[n] = span.d - i[n];
  }
  T sum[kPixelBlock][kChannelBlock];
  const T* weight = s.weight(p);
  const StridedImage<T> global_image{p.out + image * C * H * W, ImageStrides{H * W, W, 1}};
  if (kAdjoint) {
    if (kRing) {
      anticausal_neighbour_block<kPixelBlock, kChannelBlock>(weight, s.ring(p), C, H, W, p.k, i, j, pixels, ch0, sum);
    } else {
      anticausal_neighbour_block<kPixelBlock, kChannelBlock>(weight, global_image, C, H, W, p.k, i, j, pixels, ch0,
                                                             sum);
    }
  } else {
    if (kRing) {
      causal_neighbour_block<kPixelBlock, kChannelBlock>(weight, s.ring(p), C, H, W, p.k, i, j, pixels, ch0, sum);
    } else {
      causal_neighbour_block<kPixelBlock, kChannelBlock>(weight, global_image, C, H, W, p.k, i, j, pixels, ch0, sum);
    }
  }
  const T* rhs = p.rhs + image * p.rhs_stride_b;
  T* residual = s.residual(p);
  // Compile-time loop bounds (with guards) so that sum[][] is indexed by constants and stays in registers.
  CINC_UNROLL
  for (int n = 0; n < kPixelBlock; ++n) {
    if (n >= pixels) continue;
    const int pix = g + n * groups;
    CINC_UNROLL
    for (int q = 0; q < kChannelBlock; ++q) {
      const int64_t ch = ch0 + q;
      if (ch >= C) continue;
      T r = rhs[ch * p.rhs_stride_c + i[n] * p.rhs_stride_h + j[n] * p.rhs_stride_w];
      if (!kAdjoint && p.bias != nullptr) r -= p.bias[ch];
      residual[ch * p.max_diagonal + pix] = r - sum[n][q];
    }
  }
}

// Item t < count·C of the solve step: pixel t mod count, channel t div count (a warp shares a channel).
template <typename T, bool kAdjoint, bool kRing>
CINC_HD void wavefront_solve(const WavefrontParams<T>& p, const WavefrontShared<T>& s, int64_t image,
                             DiagonalSpan span, int t) {
  const int pix = t % span.count, ch = t / span.count;
  const int64_t i = span.first + pix, j = span.d - i;
  const T* r = s.residual(p) + pix;
  const T v = kAdjoint ? lower_inverse_transpose_row_dot(s.inverse_columns, r, p.max_diagonal, p.C, ch)
                       : lower_inverse_row_dot(s.inverse_columns, r, p.max_diagonal, p.C, ch);
  p.out[((image * p.C + ch) * p.H + i) * p.W + j] = v;
  if (kRing) s.work[s.ring(p).offset(ch, i, j)] = v;
}

}  // namespace cuda
}  // namespace cinc
