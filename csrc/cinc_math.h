// The arithmetic of one output pixel of a CInC convolution (docs/spec.md §1), for the CPU kernels
// (csrc/cpu/) and the CUDA kernels (csrc/cuda/).
//
// Who runs what (the scheduling — threads, wavefront, shared memory — is each backend's own):
//   both backends  weight_offset, masked_weight, solve_lower_in_place (the CUDA wavefront builds L⁻¹ with it),
//                  StridedImage, causal_neighbour_block and anticausal_neighbour_block (the tap sums of the inverse's
//                  and the adjoint's residual: blocks of 4 pixels × 4 channels per GPU thread, one pixel per call on
//                  the CPU through accumulate_causal_taps / subtract_anticausal_taps).
//   CPU only       centre_tap_columns, solve_upper_in_place, causal_tap_sum, accumulate_neighbour_taps,
//                  subtract_neighbour_taps_transposed, accumulate_causal_taps, subtract_anticausal_taps, and the block
//                  substitutions solve_lower_in_place_block / solve_upper_in_place_block, which the CPU kernels use
//                  only where they have no vectorised x86 path.
// The CUDA forward is a tiled direct convolution of its own (csrc/cuda/cinc_forward_kernel.cuh) that shares only
// masked_weight; the CUDA-only parts of the wavefront are in csrc/cuda/cinc_wavefront_block.h.
// Every function here is compiled by every CI run: by the CPU extension, and by the host build of the CUDA kernels in
// tests/cuda_emulation/run_kernels.cpp, which also compiles the block substitutions (that an x86 build of the CPU
// kernels leaves out) and checks them against the one-pixel ones.
//
// Notation follows docs/spec.md §1: weight[o, c, a, b] is (C, C, k, k) and contiguous; the centre tap is
// (k-1, k-1); L = Wm[:, :, k-1, k-1] is lower triangular (unit diagonal if asked).
//
// Strides are in elements, not bytes. Every function reads the raw weight and applies the mask itself.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CINC_HD __host__ __device__ __forceinline__
// Fully unrolled loops over compile-time block sizes keep small arrays in registers on the GPU.
#define CINC_UNROLL _Pragma("unroll")
#else
#define CINC_HD inline
#define CINC_UNROLL
#endif

namespace cinc {

// Where one image lives in memory: element strides of its channel, row and column axes.
struct ImageStrides {
  int64_t channel;
  int64_t row;
  int64_t col;
};

CINC_HD int64_t weight_offset(int64_t o, int64_t c, int a, int b, int64_t C, int k) {
  return ((o * C + c) * k + a) * k + b;
}

// Wm[o, c, a, b]: the raw weight with the centre tap made lower triangular (and unit on its diagonal if asked).
template <typename T>
CINC_HD T masked_weight(const T* weight, int64_t o, int64_t c, int a, int b, int64_t C, int k,
                        bool unit_diagonal) {
  if (a == k - 1 && b == k - 1) {
    if (c > o) return T(0);
    if (c == o && unit_diagonal) return T(1);
  }
  return weight[weight_offset(o, c, a, b, C, k)];
}

// L stored column by column (T[j * C + i] = L[i, j]); `transposed` stores Lᵀ the same way instead.
// Column storage makes both substitutions below contiguous axpys in their inner loop.
template <typename T, typename Acc>
CINC_HD void centre_tap_columns(const T* weight, int64_t C, int k, bool unit_diagonal, bool transposed,
                                Acc* columns) {
  for (int64_t i = 0; i < C; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      const Acc v = static_cast<Acc>(masked_weight(weight, i, j, k - 1, k - 1, C, k, unit_diagonal));
      if (transposed) {
        columns[i * C + j] = v;  // column i of Lᵀ is row i of L
      } else {
        columns[j * C + i] = v;
      }
    }
  }
}

// Solve L x = r in place for one pixel (forward substitution, channel 0 first). `columns` as centre_tap_columns
// with transposed = false. Division (not a stored reciprocal) keeps the solve as exact as float allows.
template <typename Acc>
CINC_HD void solve_lower_in_place(const Acc* columns, Acc* r, int64_t C) {
  for (int64_t j = 0; j < C; ++j) {
    const Acc* col = columns + j * C;
    const Acc xj = r[j] / col[j];
    r[j] = xj;
    for (int64_t i = j + 1; i < C; ++i) r[i] -= col[i] * xj;
  }
}

// Solve Lᵀ u = r in place (backward substitution, last channel first). `columns` as centre_tap_columns with
// transposed = true.
template <typename Acc>
CINC_HD void solve_upper_in_place(const Acc* columns, Acc* r, int64_t C) {
  for (int64_t j = C - 1; j >= 0; --j) {
    const Acc* col = columns + j * C;
    const Acc uj = r[j] / col[j];
    r[j] = uj;
    for (int64_t i = 0; i < j; ++i) r[i] -= col[i] * uj;
  }
}

// A strided image: pixel (i, j)'s channel 0 is at data + i·row + j·col, channel c a further c·channel along.
// The tap sums below read images only through `pixel(i, j)` and `channel_stride()`, so a backend can hand them any
// storage with that shape of access (the CUDA wavefront passes a ring of recent anti-diagonals in shared memory).
// The two substitutions above for P independent pixels at once, the residuals interleaved: r[c * P + p] is channel
// c of pixel p. Each pixel sees exactly the operations of the one-pixel version in the same order (bitwise equal
// results); interleaving hides the division's latency behind the other pixels and vectorises across them.
template <int P, typename Acc>
CINC_HD void solve_lower_in_place_block(const Acc* columns, Acc* r, int64_t C) {
  for (int64_t j = 0; j < C; ++j) {
    const Acc* col = columns + j * C;
    Acc xj[P];
    CINC_UNROLL
    for (int p = 0; p < P; ++p) {
      xj[p] = r[j * P + p] / col[j];
      r[j * P + p] = xj[p];
    }
    for (int64_t i = j + 1; i < C; ++i) {
      const Acc l = col[i];
      CINC_UNROLL
      for (int p = 0; p < P; ++p) r[i * P + p] -= l * xj[p];
    }
  }
}

template <int P, typename Acc>
CINC_HD void solve_upper_in_place_block(const Acc* columns, Acc* r, int64_t C) {
  for (int64_t j = C - 1; j >= 0; --j) {
    const Acc* col = columns + j * C;
    Acc uj[P];
    CINC_UNROLL
    for (int p = 0; p < P; ++p) {
      uj[p] = r[j * P + p] / col[j];
      r[j * P + p] = uj[p];
    }
    for (int64_t i = 0; i < j; ++i) {
      const Acc l = col[i];
      CINC_UNROLL
      for (int p = 0; p < P; ++p) r[i * P + p] -= l * uj[p];
    }
  }
}

template <typename T>
struct StridedImage {
  const T* data;
  ImageStrides s;
  CINC_HD const T* pixel(int64_t i, int64_t j) const { return data + i * s.row + j * s.col; }
  CINC_HD int64_t channel_stride() const { return s.channel; }
};

// Σ_{c, (a, b)} Wm[o, c, a, b] · x[c, i + a - (k-1), j + b - (k-1)] for ONE output channel o, over the taps of pixel
// (i, j) that fall inside the H×W image; the centre tap is skipped when `with_centre` is false. (The wavefronts use
// the blocked neighbour sums below instead.)
template <typename Acc, typename T, typename Image>
CINC_HD Acc causal_tap_sum(const T* weight, const Image& x, int64_t C, int64_t H, int64_t W, int k,
                           bool unit_diagonal, int64_t i, int64_t j, int64_t o, bool with_centre) {
  Acc sum = Acc(0);
  const int64_t cs = x.channel_stride();
  for (int a = 0; a < k; ++a) {
    const int64_t ii = i + a - (k - 1);
    if (ii < 0 || ii >= H) continue;
    for (int b = 0; b < k; ++b) {
      const int64_t jj = j + b - (k - 1);
      if (jj < 0 || jj >= W) continue;
      const bool centre = a == k - 1 && b == k - 1;
      if (centre && !with_centre) continue;
      const auto* xp = x.pixel(ii, jj);
      if (centre) {
        for (int64_t c = 0; c < C; ++c) {
          sum += static_cast<Acc>(masked_weight(weight, o, c, a, b, C, k, unit_diagonal)) *
                 static_cast<Acc>(xp[c * cs]);
        }
      } else {
        // Off-centre taps are never masked: read the weight directly (the GPU's hot loop).
        const T* wp = weight + weight_offset(o, 0, a, b, C, k);
        for (int64_t c = 0; c < C; ++c) {
          sum += static_cast<Acc>(wp[c * k * k]) * static_cast<Acc>(xp[c * cs]);
        }
      }
    }
  }
  return sum;
}

// The wavefronts' residual: tap sums over the off-centre ("neighbour") taps for a block of P pixels × Q channels.
// Each neighbour value is loaded once for Q channels and each weight once for P pixels, so a GPU thread does
// (P + Q) loads per P·Q multiply-adds instead of 2 per one. Pixel p is (i[p], j[p]) for p < pixels (the rest of the
// block is ignored); channels past C are computed from channel C-1's weights and must be discarded by the caller.
//
// causal: sum[p][q] = Σ_{c, (a, b) ≠ centre} Wm[o0+q, c, a, b] · x[c, i[p] + a - (k-1), j[p] + b - (k-1)]
template <int P, int Q, typename Acc, typename T, typename Image>
CINC_HD void causal_neighbour_block(const T* weight, const Image& x, int64_t C, int64_t H, int64_t W, int k,
                                    const int64_t* i, const int64_t* j, int pixels, int64_t o0, Acc (*sum)[Q]) {
  CINC_UNROLL
  for (int p = 0; p < P; ++p) {
    CINC_UNROLL
    for (int q = 0; q < Q; ++q) sum[p][q] = Acc(0);
  }
  const int64_t cs = x.channel_stride(), kk = static_cast<int64_t>(k) * k;
  int64_t weight_row[Q];  // the output channels' rows of the weight, clamped to C-1
  CINC_UNROLL
  for (int q = 0; q < Q; ++q) weight_row[q] = (o0 + q < C ? o0 + q : C - 1) * C * kk;
  for (int a = 0; a < k; ++a) {
    for (int b = 0; b < k; ++b) {
      if (a == k - 1 && b == k - 1) continue;
      const T* xp[P];
      bool any = false;
      CINC_UNROLL
      for (int p = 0; p < P; ++p) {
        const int64_t ii = i[p] + a - (k - 1), jj = j[p] + b - (k - 1);
        const bool inside = p < pixels && ii >= 0 && ii < H && jj >= 0 && jj < W;
        xp[p] = inside ? x.pixel(ii, jj) : nullptr;
        any |= inside;
      }
      if (!any) continue;
      const T* wp = weight + a * k + b;
      for (int64_t c = 0; c < C; ++c) {
        Acc xv[P];
        CINC_UNROLL
        for (int p = 0; p < P; ++p) xv[p] = xp[p] != nullptr ? static_cast<Acc>(xp[p][c * cs]) : Acc(0);
        CINC_UNROLL
        for (int q = 0; q < Q; ++q) {
          const Acc w = static_cast<Acc>(wp[weight_row[q] + c * kk]);
          CINC_UNROLL
          for (int p = 0; p < P; ++p) sum[p][q] += w * xv[p];
        }
      }
    }
  }
}

// adjoint: sum[p][q] = Σ_{o, (a, b) ≠ centre} Wm[o, c0+q, a, b] · u[o, i[p] + k-1-a, j[p] + k-1-b]
// (the neighbours lie below and to the right).
template <int P, int Q, typename Acc, typename T, typename Image>
CINC_HD void anticausal_neighbour_block(const T* weight, const Image& u, int64_t C, int64_t H, int64_t W, int k,
                                        const int64_t* i, const int64_t* j, int pixels, int64_t c0,
                                        Acc (*sum)[Q]) {
  CINC_UNROLL
  for (int p = 0; p < P; ++p) {
    CINC_UNROLL
    for (int q = 0; q < Q; ++q) sum[p][q] = Acc(0);
  }
  const int64_t cs = u.channel_stride(), kk = static_cast<int64_t>(k) * k;
  int64_t weight_column[Q];  // the input channels' offsets inside a weight row, clamped to C-1
  CINC_UNROLL
  for (int q = 0; q < Q; ++q) weight_column[q] = (c0 + q < C ? c0 + q : C - 1) * kk;
  for (int a = 0; a < k; ++a) {
    for (int b = 0; b < k; ++b) {
      if (a == k - 1 && b == k - 1) continue;
      const T* up[P];
      bool any = false;
      CINC_UNROLL
      for (int p = 0; p < P; ++p) {
        const int64_t ii = i[p] + (k - 1 - a), jj = j[p] + (k - 1 - b);
        const bool inside = p < pixels && ii < H && jj < W;
        up[p] = inside ? u.pixel(ii, jj) : nullptr;
        any |= inside;
      }
      if (!any) continue;
      const T* wp = weight + a * k + b;
      for (int64_t o = 0; o < C; ++o) {
        Acc uv[P];
        CINC_UNROLL
        for (int p = 0; p < P; ++p) uv[p] = up[p] != nullptr ? static_cast<Acc>(up[p][o * cs]) : Acc(0);
        const T* wo = wp + o * C * kk;
        CINC_UNROLL
        for (int q = 0; q < Q; ++q) {
          const Acc w = static_cast<Acc>(wo[weight_column[q]]);
          CINC_UNROLL
          for (int p = 0; p < P; ++p) sum[p][q] += w * uv[p];
        }
      }
    }
  }
}

// The CPU's per-pixel tap loops below run the same blocked sums as the GPU, with one pixel per call and blocks of
// 4 channels (1 when there are fewer than 4 channels, so that none is computed in vain).
template <int Q, typename T, typename Acc, typename Image>
CINC_HD void accumulate_neighbour_taps(const T* weight, const Image& x, int64_t C, int64_t H, int64_t W, int k,
                                       int64_t i, int64_t j, Acc sign, Acc* acc) {
  for (int64_t o0 = 0; o0 < C; o0 += Q) {
    Acc sum[1][Q];
    causal_neighbour_block<1, Q>(weight, x, C, H, W, k, &i, &j, 1, o0, sum);
    for (int q = 0; q < Q && o0 + q < C; ++q) acc[o0 + q] += sign * sum[0][q];
  }
}

template <int Q, typename T, typename Acc, typename Image>
CINC_HD void subtract_neighbour_taps_transposed(const T* weight, const Image& u, int64_t C, int64_t H, int64_t W,
                                                int k, int64_t i, int64_t j, Acc* acc) {
  for (int64_t c0 = 0; c0 < C; c0 += Q) {
    Acc sum[1][Q];
    anticausal_neighbour_block<1, Q>(weight, u, C, H, W, k, &i, &j, 1, c0, sum);
    for (int q = 0; q < Q && c0 + q < C; ++q) acc[c0 + q] -= sum[0][q];
  }
}

// acc[o] += sign · Σ_{c, (a, b)} Wm[o, c, a, b] · x[c, i + a - (k-1), j + b - (k-1)] for every o, over the taps inside
// the image (the centre one too when `with_centre`). `x` points at the image's element (0, 0, 0).
template <typename T, typename Acc>
CINC_HD void accumulate_causal_taps(const T* weight, const T* x, ImageStrides s, int64_t C, int64_t H, int64_t W,
                                    int k, bool unit_diagonal, int64_t i, int64_t j, bool with_centre, Acc sign,
                                    Acc* acc) {
  const StridedImage<T> image{x, s};
  if (with_centre) {
    for (int64_t o = 0; o < C; ++o) {
      acc[o] += sign * causal_tap_sum<Acc>(weight, image, C, H, W, k, unit_diagonal, i, j, o, true);
    }
  } else if (C >= 4) {
    accumulate_neighbour_taps<4>(weight, image, C, H, W, k, i, j, sign, acc);
  } else {
    accumulate_neighbour_taps<1>(weight, image, C, H, W, k, i, j, sign, acc);
  }
}

// acc[c] -= Σ_{o, (a, b) ≠ centre} Wm[o, c, a, b] · u[o, i + k-1-a, j + k-1-b] for every c: the adjoint's tap loop.
template <typename T, typename Acc>
CINC_HD void subtract_anticausal_taps(const T* weight, const T* u, ImageStrides s, int64_t C, int64_t H, int64_t W,
                                      int k, int64_t i, int64_t j, Acc* acc) {
  const StridedImage<T> image{u, s};
  if (C >= 4) {
    subtract_neighbour_taps_transposed<4>(weight, image, C, H, W, k, i, j, acc);
  } else {
    subtract_neighbour_taps_transposed<1>(weight, image, C, H, W, k, i, j, acc);
  }
}

}  // namespace cinc
