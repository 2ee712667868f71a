// The arithmetic of one output pixel of a CInC convolution, shared by the CPU and the CUDA kernels.
//
// Only scheduling differs between backends (threads, wavefront, shared memory); the tap loop and the channel
// substitution below are the same code on both, so CI's CPU tests exercise the arithmetic that runs on the GPU.
// Notation follows shared/SPEC.md §1: weight[o, c, a, b] is (C, C, k, k) and contiguous; the centre tap is
// (k-1, k-1); L = Wm[:, :, k-1, k-1] is lower triangular (unit diagonal if asked).
//
// Strides are in elements, not bytes. Every function reads the raw weight and applies the mask itself.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CINC_HD __host__ __device__ __forceinline__
#else
#define CINC_HD inline
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
template <typename T>
struct StridedImage {
  const T* data;
  ImageStrides s;
  CINC_HD const T* pixel(int64_t i, int64_t j) const { return data + i * s.row + j * s.col; }
  CINC_HD int64_t channel_stride() const { return s.channel; }
};

// Σ_{c, (a, b)} Wm[o, c, a, b] · x[c, i + a - (k-1), j + b - (k-1)] for ONE output channel o, over the taps of pixel
// (i, j) that fall inside the H×W image; the centre tap is skipped when `with_centre` is false (the inverse's
// residual). One output channel per call lets a GPU give each (pixel, channel) pair its own thread.
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

// The adjoint's tap sum for ONE input channel c: Σ_{o, (a, b) ≠ centre} Wm[o, c, a, b] · u[o, i + k-1-a, j + k-1-b]
// over neighbours inside the image (they lie below and to the right of pixel (i, j)).
template <typename Acc, typename T, typename Image>
CINC_HD Acc anticausal_tap_sum(const T* weight, const Image& u, int64_t C, int64_t H, int64_t W, int k, int64_t i,
                               int64_t j, int64_t c) {
  Acc sum = Acc(0);
  const int64_t cs = u.channel_stride();
  for (int a = 0; a < k; ++a) {
    const int64_t ii = i + (k - 1 - a);
    if (ii >= H) continue;
    for (int b = 0; b < k; ++b) {
      const int64_t jj = j + (k - 1 - b);
      if (jj >= W) continue;
      if (a == k - 1 && b == k - 1) continue;
      const auto* up = u.pixel(ii, jj);
      const T* wp = weight + weight_offset(0, c, a, b, C, k);
      for (int64_t o = 0; o < C; ++o) {
        sum += static_cast<Acc>(wp[o * C * k * k]) * static_cast<Acc>(up[o * cs]);
      }
    }
  }
  return sum;
}

// acc[o] += sign · Σ_{c, (a, b)} Wm[o, c, a, b] · x[c, i + a - (k-1), j + b - (k-1)] for every o: the CPU's
// per-pixel form of causal_tap_sum. `x` points at the image's element (0, 0, 0).
template <typename T, typename Acc>
CINC_HD void accumulate_causal_taps(const T* weight, const T* x, ImageStrides s, int64_t C, int64_t H, int64_t W,
                                    int k, bool unit_diagonal, int64_t i, int64_t j, bool with_centre, Acc sign,
                                    Acc* acc) {
  const StridedImage<T> image{x, s};
  for (int64_t o = 0; o < C; ++o) {
    acc[o] += sign * causal_tap_sum<Acc>(weight, image, C, H, W, k, unit_diagonal, i, j, o, with_centre);
  }
}

// acc[c] -= anticausal_tap_sum(..., c) for every c: the CPU's per-pixel form of the adjoint's tap loop.
template <typename T, typename Acc>
CINC_HD void subtract_anticausal_taps(const T* weight, const T* u, ImageStrides s, int64_t C, int64_t H, int64_t W,
                                      int k, int64_t i, int64_t j, Acc* acc) {
  const StridedImage<T> image{u, s};
  for (int64_t c = 0; c < C; ++c) acc[c] -= anticausal_tap_sum<Acc>(weight, image, C, H, W, k, i, j, c);
}

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

}  // namespace cinc
