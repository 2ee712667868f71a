// The inverse x = M⁻¹(y − bias) and its adjoint u = M⁻ᵀ g on the CPU (docs/spec.md §1): one wavefront over the
// anti-diagonals, run from the top-left (inverse) or the bottom-right (adjoint). Tiled: the off-centre tap sums of
// blocks of pixels from the micro-kernel of cinc_cpu_common.h, then a block substitution; direct: cinc_math.h's tap
// loop and substitution one pixel per task.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cpu.h"
#include "cinc_cpu_common.h"

namespace cinc {
namespace cpu {
namespace {

// Below this many multiply-adds on the longest anti-diagonal, a wavefront over few images runs on one thread.
constexpr int64_t kSerialWavefrontWork = int64_t(1) << 20;

// With at least this many images, threads split the batch instead of each anti-diagonal (see solve_cpu).
constexpr int64_t kBatchSplitMinImages = 2;

// Pixels (i, d - i) of anti-diagonal d of an H×W image, i in [first, first + count).
struct Diagonal {
  int64_t first;
  int64_t count;
};

inline Diagonal diagonal(int64_t d, int64_t H, int64_t W) {
  const int64_t first = std::max<int64_t>(0, d - (W - 1));
  const int64_t last = std::min<int64_t>(H - 1, d);
  return {first, last - first + 1};
}

at::Tensor to_channels_last_buffer(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, C)
}

at::Tensor from_channels_last_buffer(const at::Tensor& t) {
  return t.permute({0, 3, 1, 2}).contiguous();  // (B, C, H, W)
}

// `weight` contiguous. Reads the C diagonal entries directly: a handful of ATen ops here cost more than a small solve.
void check_nonsingular(const at::Tensor& weight, bool unit_diagonal) {
  if (unit_diagonal) return;
  const int64_t C = weight.size(0);
  const int k = static_cast<int>(weight.size(3));
  bool singular = false;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "cinc_check_nonsingular_cpu", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) singular |= w[weight_offset(c, c, k - 1, k - 1, C, k)] == scalar_t(0);
  });
  TORCH_CHECK_VALUE(!singular,
              "weight: the centre tap weight[:, :, k-1, k-1] has a zero on its diagonal, so the convolution is "
              "singular and has no inverse (its log-determinant is -inf)");
}

// The centre tap stored twice: by columns for the one-pixel substitutions of cinc_math.h, and by rows of the matrix
// being solved (L for the inverse, Lᵀ for the adjoint) for the block substitution.
template <typename T>
struct Triangle {
  std::vector<T> columns, rows;
  Triangle(const at::Tensor& weight, bool unit_diagonal, bool adjoint) {
    const int64_t C = weight.size(0);
    const int k = static_cast<int>(weight.size(3));
    columns.resize(C * C);
    rows.resize(C * C);
    centre_tap_columns(weight.data_ptr<T>(), C, k, unit_diagonal, adjoint, columns.data());
    // Column i of Lᵀ is row i of L, so the other storage is the row-major form of the solved matrix.
    centre_tap_columns(weight.data_ptr<T>(), C, k, unit_diagonal, !adjoint, rows.data());
  }
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// kSolveBlock pixels interleaved (r[c * kSolveBlock + p]), solved row by row of the triangular matrix with the pixels
// in one vector register: every pixel sees the same operations in the same order as solve_lower_in_place /
// solve_upper_in_place, so results are bitwise equal (the build disables FMA contraction). An AVX2 build of it runs
// where the CPU has AVX2 (checked once), the baseline one elsewhere.
template <typename T, typename V>
__attribute__((always_inline)) inline void solve_block_by_rows(const T* rows, T* r, int64_t C, bool upper) {
  constexpr int kVectors = kSolveBlock * sizeof(T) / sizeof(V);
  V* rv = reinterpret_cast<V*>(r);
  for (int64_t step = 0; step < C; ++step) {
    const int64_t i = upper ? C - 1 - step : step;
    const T* row = rows + i * C;
    V acc[kVectors];
    for (int v = 0; v < kVectors; ++v) acc[v] = rv[i * kVectors + v];
    if (upper) {
      for (int64_t j = C - 1; j > i; --j) {
        for (int v = 0; v < kVectors; ++v) acc[v] -= row[j] * rv[j * kVectors + v];
      }
    } else {
      for (int64_t j = 0; j < i; ++j) {
        for (int v = 0; v < kVectors; ++v) acc[v] -= row[j] * rv[j * kVectors + v];
      }
    }
    for (int v = 0; v < kVectors; ++v) rv[i * kVectors + v] = acc[v] / row[i];
  }
}

// Naturally (32-byte) aligned: solve_rows hands in a 64-byte aligned block.
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));

template <typename T, typename V>
void solve_block_baseline(const T* rows, T* r, int64_t C, bool upper) {
  solve_block_by_rows<T, V>(rows, r, C, upper);
}

template <typename T, typename V>
__attribute__((target("avx2"))) void solve_block_avx2(const T* rows, T* r, int64_t C, bool upper) {
  solve_block_by_rows<T, V>(rows, r, C, upper);
}

template <typename T, typename V>
void solve_block_vectorised(const T* rows, T* r, int64_t C, bool upper) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    solve_block_avx2<T, V>(rows, r, C, upper);
  } else {
    solve_block_baseline<T, V>(rows, r, C, upper);
  }
}
#endif

template <typename T>
void solve_block(const Triangle<T>& tri, T* r, int64_t C, bool adjoint) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (std::is_same_v<T, float>) {
    solve_block_vectorised<float, Float8>(tri.rows.data(), r, C, adjoint);
  } else {
    solve_block_vectorised<double, Double4>(tri.rows.data(), r, C, adjoint);
  }
#else
  if (adjoint) {
    solve_upper_in_place_block<kSolveBlock>(tri.columns.data(), r, C);
  } else {
    solve_lower_in_place_block<kSolveBlock>(tri.columns.data(), r, C);
  }
#endif
}

// Solve rows [begin, end) of `residuals` ((n, C) row-major; L x = r, or Lᵀ u = r for the adjoint) and hand each
// solution to store(n, x). Full blocks of kSolveBlock rows go through the vectorised block substitution.
template <typename T, typename Store>
void solve_rows(const Triangle<T>& tri, const T* residuals, int64_t begin, int64_t end, int64_t C, bool adjoint,
                Store store) {
  std::vector<T> storage(C * kSolveBlock + 64 / sizeof(T));
  T* block = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 63) & ~std::uintptr_t(63));
  std::vector<T> x(C);
  int64_t n = begin;
  for (; n + kSolveBlock <= end; n += kSolveBlock) {
    for (int p = 0; p < kSolveBlock; ++p) {
      for (int64_t c = 0; c < C; ++c) block[c * kSolveBlock + p] = residuals[(n + p) * C + c];
    }
    solve_block(tri, block, C, adjoint);
    for (int p = 0; p < kSolveBlock; ++p) {
      for (int64_t c = 0; c < C; ++c) x[c] = block[c * kSolveBlock + p];
      store(n + p, x.data());
    }
  }
  for (; n < end; ++n) {
    std::copy(residuals + n * C, residuals + (n + 1) * C, x.begin());
    if (adjoint) {
      solve_upper_in_place(tri.columns.data(), x.data(), C);
    } else {
      solve_lower_in_place(tri.columns.data(), x.data(), C);
    }
    store(n, x.data());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The tiled wavefront. For each block of kSolveBlock pixels of an anti-diagonal (taken across the images of a group,
// so that short diagonals still fill blocks), the off-centre tap sums come from the micro-kernel above, reading the
// padded channels-last solution directly; then the block is substituted and written both into the padded solution
// and into the NCHW result. No window matrix is gathered and no BLAS call is made per diagonal, and every pixel's
// arithmetic is fixed by construction, so the result does not depend on how pixels are split between threads.

// One inverse (or adjoint) solve: what every block needs.
template <typename T>
struct TiledWavefront {
  int64_t C, H, W, Hp, Wp;
  int k;
  bool adjoint;
  TapSums<T> sums;
  TapSumsFn<T> sums_kernel;
  const Triangle<T>* triangle;
  const T* y;  // right-hand side, any strides
  int64_t y_batch, y_channel, y_row, y_col;
  const T* bias;  // or nullptr
  T* out;         // (B, C, H, W) contiguous
};

// Blocks [block_begin, block_end) of anti-diagonal d over `images` images from `first_image` on, whose padded
// solutions are `padded` ((images, Hp, Wp, C); zero outside the images). `scratch`: AlignedBuffer of
// 2·kSolveBlock·Cp elements.
template <typename T>
void tiled_blocks(const TiledWavefront<T>& tw, T* padded, int64_t first_image, int64_t images, int64_t d,
                  int64_t block_begin, int64_t block_end, T* scratch) {
  const Diagonal diag = diagonal(d, tw.H, tw.W);
  const int64_t rows = images * diag.count;
  const int64_t C = tw.C, Cp = tw.sums.padded_channels, HW = tw.H * tw.W;
  const int64_t row_stride = tw.Wp * C, image_stride = tw.Hp * row_stride;
  const int64_t shift = tw.adjoint ? 0 : tw.k - 1;  // where pixel (0, 0) sits in its padded image
  T* sums = scratch;
  T* block = scratch + kSolveBlock * Cp;
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t n0 = blk * kSolveBlock;
    const int count = static_cast<int>(std::min<int64_t>(kSolveBlock, rows - n0));
    int64_t image[kSolveBlock], row[kSolveBlock], col[kSolveBlock];
    const T* corner[kSolveBlock];
    // Row n of the diagonal is pixel (first + n % count, ·) of image n / count; one division per block, then steps.
    int64_t g = n0 / diag.count, i = diag.first + n0 % diag.count;
    for (int p = 0; p < kSolveBlock; ++p) {
      // A short last block repeats its last pixel: the lanes are independent, so the copies change no result.
      image[p] = g;
      row[p] = i;
      col[p] = d - i;
      // The window of pixel (i, j) starts at padded (i, j) in both layouts (top-left padding for the inverse,
      // bottom-right for the adjoint).
      corner[p] = padded + g * image_stride + i * row_stride + col[p] * C;
      if (p + 1 < count && ++i == diag.first + diag.count) {
        i = diag.first;
        ++g;
      }
    }
    tw.sums_kernel(tw.sums, corner, sums);
    for (int p = 0; p < kSolveBlock; ++p) {
      const T* rhs = tw.y + (first_image + image[p]) * tw.y_batch + row[p] * tw.y_row + col[p] * tw.y_col;
      for (int64_t o = 0; o < C; ++o) {
        const T value = tw.bias != nullptr ? rhs[o * tw.y_channel] - tw.bias[o] : rhs[o * tw.y_channel];
        block[o * kSolveBlock + p] = value - sums[p * Cp + o];
      }
    }
    solve_block(*tw.triangle, block, C, tw.adjoint);
    for (int p = 0; p < count; ++p) {
      T* solution = padded + image[p] * image_stride + (row[p] + shift) * row_stride + (col[p] + shift) * C;
      T* result = tw.out + (first_image + image[p]) * C * HW + row[p] * tw.W + col[p];
      for (int64_t o = 0; o < C; ++o) {
        const T x = block[o * kSolveBlock + p];
        solution[o] = x;
        result[o * HW] = x;
      }
    }
  }
}

// Images solved together share the blocks of each anti-diagonal; their padded solutions should stay in the L2 cache.
constexpr int64_t kGroupBytes = int64_t(1) << 19;

template <typename T>
at::Tensor wavefront_tiled(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool unit_diagonal, bool adjoint) {
  const int64_t B = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  const int k = static_cast<int>(weight.size(3));
  const int64_t K = k * k * C;
  const VectorTaps<T> taps(weight, unit_diagonal, false, adjoint);
  const int64_t Cp = taps.padded_channels;
  const Triangle<T> tri(weight, unit_diagonal, adjoint);
  at::Tensor out = at::empty({B, C, H, W}, y.options());
  TiledWavefront<T> tw{};
  tw.C = C;
  tw.H = H;
  tw.W = W;
  tw.Hp = H + k - 1;
  tw.Wp = W + k - 1;
  tw.k = k;
  tw.adjoint = adjoint;
  tw.sums = taps.sums(C, tw.Wp * C, k, adjoint, false);
  tw.sums_kernel = tap_sums_kernel<T>(taps.bytes);
  tw.triangle = &tri;
  tw.y = y.data_ptr<T>();
  tw.y_batch = y.stride(0);
  tw.y_channel = y.stride(1);
  tw.y_row = y.stride(2);
  tw.y_col = y.stride(3);
  tw.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  tw.out = out.data_ptr<T>();
  const int64_t image_elements = tw.Hp * tw.Wp * C;
  const int64_t group_max = std::max<int64_t>(1, kGroupBytes / (image_elements * static_cast<int64_t>(sizeof(T))));
  const int64_t diagonals = H + W - 1;

  // Runs the whole wavefront of images [begin, end) on this thread, a group of images at a time.
  const auto solve_images = [&](int64_t begin, int64_t end) {
    const int64_t group = std::min(group_max, end - begin);
    std::vector<T> padded(group * image_elements, T(0));  // the padding stays zero: only pixels are written
    AlignedBuffer<T> scratch(2 * kSolveBlock * Cp);
    for (int64_t first = begin; first < end; first += group) {
      const int64_t images = std::min(group, end - first);
      for (int64_t step = 0; step < diagonals; ++step) {
        const int64_t d = adjoint ? diagonals - 1 - step : step;
        const int64_t blocks = (images * diagonal(d, H, W).count + kSolveBlock - 1) / kSolveBlock;
        tiled_blocks(tw, padded.data(), first, images, d, 0, blocks, scratch.data);
      }
    }
  };

  const int64_t block_work = kSolveBlock * K * C;
  if (B >= kBatchSplitMinImages && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // Each thread runs the whole wavefront over its own images: no barrier per anti-diagonal.
    at::parallel_for(0, B, 1, solve_images);
  } else if (at::get_num_threads() == 1 || at::in_parallel_region() ||
             B * std::min(H, W) * K * C < kSerialWavefrontWork) {
    solve_images(0, B);
  } else {
    // One large image: the blocks of each anti-diagonal are split between threads (a barrier per diagonal).
    std::vector<T> padded(B * image_elements, T(0));
    for (int64_t step = 0; step < diagonals; ++step) {
      const int64_t d = adjoint ? diagonals - 1 - step : step;
      const int64_t blocks = (B * diagonal(d, H, W).count + kSolveBlock - 1) / kSolveBlock;
      at::parallel_for(0, blocks, grain_for(block_work), [&](int64_t begin, int64_t end) {
        AlignedBuffer<T> scratch(2 * kSolveBlock * Cp);
        tiled_blocks(tw, padded.data(), 0, B, d, begin, end, scratch.data);
      });
    }
  }
  return out;
}

// Solves the system for all pixels of `rhs` (B, H, W, C), channels-last, contiguous, already minus the bias.
template <typename T>
at::Tensor wavefront_direct(const at::Tensor& rhs, const at::Tensor& weight, bool unit_diagonal, bool adjoint) {
  const int64_t B = rhs.size(0), H = rhs.size(1), W = rhs.size(2), C = rhs.size(3);
  const int k = static_cast<int>(weight.size(3));
  std::vector<T> columns(C * C);
  centre_tap_columns(weight.data_ptr<T>(), C, k, unit_diagonal, adjoint, columns.data());
  at::Tensor sol = at::zeros_like(rhs);
  const T* w = weight.data_ptr<T>();
  const T* rp = rhs.data_ptr<T>();
  T* xp = sol.data_ptr<T>();
  const ImageStrides s{1, W * C, C};
  for (int64_t step = 0; step < H + W - 1; ++step) {
    const int64_t d = adjoint ? H + W - 2 - step : step;
    const Diagonal diag = diagonal(d, H, W);
    at::parallel_for(0, B * diag.count, grain_for(C * C * k * k), [&](int64_t begin, int64_t end) {
      std::vector<T> acc(C);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / diag.count, i = diag.first + n % diag.count, j = d - i;
        const int64_t offset = ((b * H + i) * W + j) * C;
        std::copy(rp + offset, rp + offset + C, acc.begin());
        T* image = xp + b * H * W * C;
        if (adjoint) {
          subtract_anticausal_taps(w, image, s, C, H, W, k, i, j, acc.data());
          solve_upper_in_place(columns.data(), acc.data(), C);
        } else {
          accumulate_causal_taps(w, image, s, C, H, W, k, unit_diagonal, i, j, false, T(-1), acc.data());
          solve_lower_in_place(columns.data(), acc.data(), C);
        }
        std::copy(acc.begin(), acc.end(), xp + offset);
      }
    });
  }
  return sol;
}

// With k = 1 no pixel depends on another: every pixel is solved at once.
template <typename T>
at::Tensor solve_pixels(const at::Tensor& rhs, const at::Tensor& weight, bool unit_diagonal, bool adjoint) {
  const int64_t C = rhs.size(3);
  const Triangle<T> tri(weight, unit_diagonal, adjoint);
  at::Tensor sol = rhs.clone();
  T* xp = sol.data_ptr<T>();
  at::parallel_for(0, sol.numel() / C, grain_for(C * C), [&](int64_t begin, int64_t end) {
    solve_rows(tri, xp, begin, end, C, adjoint,
               [&](int64_t n, const T* x) { std::memcpy(xp + n * C, x, sizeof(T) * C); });
  });
  return sol;
}

at::Tensor solve_cpu(const at::Tensor& rhs_nchw, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     bool unit_diagonal, bool adjoint) {
  const at::Tensor w = weight.contiguous();
  check_nonsingular(w, unit_diagonal);
  if (rhs_nchw.numel() == 0) return at::zeros(rhs_nchw.sizes(), rhs_nchw.options());
  const int64_t k = w.size(3);
  if (k > 1 && !use_direct_schedule()) {
    const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(rhs_nchw.scalar_type(), "cinc_solve_tiled_cpu", [&] {
      out = wavefront_tiled<scalar_t>(rhs_nchw, w, bc, unit_diagonal, adjoint);
    });
    return out;
  }
  at::Tensor rhs = to_channels_last_buffer(rhs_nchw);
  if (bias.has_value()) rhs = rhs - *bias;
  const auto solve = [&](const at::Tensor& part) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "cinc_solve_cpu", [&] {
      out = k == 1 ? solve_pixels<scalar_t>(part, w, unit_diagonal, adjoint)
                   : wavefront_direct<scalar_t>(part, w, unit_diagonal, adjoint);
    });
    return out;
  };
  const int64_t B = rhs.size(0), C = rhs.size(3);
  at::Tensor sol;
  if (k > 1 && B >= kBatchSplitMinImages && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // Each thread runs the whole wavefront over its own images: no barrier per anti-diagonal.
    sol = at::empty_like(rhs);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      sol.narrow(0, begin, end - begin).copy_(solve(rhs.narrow(0, begin, end - begin)));
    });
  } else if (B * std::min(rhs.size(1), rhs.size(2)) * k * k * C * C < kSerialWavefrontWork) {
    // Too little work per anti-diagonal to pay for waking threads ~3 times per diagonal (benchmarks/results/
    // cpu_ops.md, 1 and 2 threads). The guard keeps nested parallel_for calls on this thread.
    c10::ParallelGuard serial(true);
    sol = solve(rhs);
  } else {
    sol = solve(rhs);
  }
  return from_channels_last_buffer(sol);
}

}  // namespace

at::Tensor inverse_cpu(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal) {
  check_conv_args(y, "y", weight, bias);
  return solve_cpu(y, weight, bias, unit_diagonal, false);
}

at::Tensor inverse_transpose_cpu(const at::Tensor& g, const at::Tensor& weight, bool unit_diagonal) {
  check_conv_args(g, "g", weight, std::nullopt);
  return solve_cpu(g, weight, std::nullopt, unit_diagonal, true);
}

}  // namespace cpu
}  // namespace cinc
