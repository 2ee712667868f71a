// CPU kernels of the CInC convolution: forward, wavefront inverse, its adjoint, log-determinant.
//
// Two schedules share the per-pixel arithmetic of cinc_math.h:
//  * direct: one task per pixel runs the tap loop and the channel substitution (few channels);
//  * gemm:   each anti-diagonal's neighbour windows are gathered into a (pixels, k²C) matrix and multiplied by the
//            masked taps in one BLAS call, then every pixel of the diagonal is substituted in parallel.
// Both keep the working image channels-last (B, H, W, C), so a pixel's channels and a window row's k·C values are
// contiguous; results are returned as contiguous NCHW tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cinc_checks.h"
#include "../cinc_math.h"

namespace cinc {
namespace {

// From this many channels on, the gathered matrix product beats the per-pixel tap loop
// (benchmarks/bench_cpu_ops.py --schedules; results/cpu_ops.md). CINC_CPU_GEMM_MIN_CHANNELS overrides it, read at
// every call so a benchmark can compare the two schedules in one process.
constexpr int64_t kGemmMinChannels = 6;

// Rows of the gathered window matrix per BLAS call of the forward; bounds its memory to ~16 MiB at float32.
constexpr int64_t kForwardGatherElements = int64_t(1) << 22;

// Below this many multiply-adds on the longest anti-diagonal, a wavefront over few images runs on one thread.
constexpr int64_t kSerialWavefrontWork = int64_t(1) << 20;

// With at least this many images, threads split the batch instead of each anti-diagonal (see solve_cpu).
constexpr int64_t kBatchSplitMinImages = 2;

bool use_gemm(int64_t C) {
  const char* env = std::getenv("CINC_CPU_GEMM_MIN_CHANNELS");
  const int64_t threshold = (env != nullptr && *env != '\0') ? std::atoll(env) : kGemmMinChannels;
  return C >= threshold;
}

// The taps as a (k²C, C) matrix for window-times-matrix products. Causal (forward, inverse): row (a·k + b)·C + c,
// column o holds Wm[o, c, a, b]. Anticausal (adjoint): window row r, column s is the tap (k-1-r, k-1-s), and row
// (r·k + s)·C + o, column c holds Wm[o, c, k-1-r, k-1-s]. The centre tap's block is zero unless `with_centre`.
template <typename T>
at::Tensor tap_matrix(const at::Tensor& weight, bool unit_diagonal, bool with_centre, bool anticausal) {
  const int64_t C = weight.size(0);
  const int k = static_cast<int>(weight.size(3));
  at::Tensor out = at::empty({k * k * C, C}, weight.options());
  const T* w = weight.data_ptr<T>();
  T* m = out.data_ptr<T>();
  for (int r = 0; r < k; ++r) {
    for (int s = 0; s < k; ++s) {
      const int a = anticausal ? k - 1 - r : r;
      const int b = anticausal ? k - 1 - s : s;
      const bool centre = a == k - 1 && b == k - 1;
      for (int64_t p = 0; p < C; ++p) {
        for (int64_t q = 0; q < C; ++q) {
          // causal: p = c (input channel), q = o; anticausal: p = o, q = c.
          const int64_t o = anticausal ? p : q;
          const int64_t c = anticausal ? q : p;
          const T v = (centre && !with_centre) ? T(0) : masked_weight(w, o, c, a, b, C, k, unit_diagonal);
          m[((r * k + s) * C + p) * C + q] = v;
        }
      }
    }
  }
  return out;
}

// Copy the k×k window whose top-left corner is (i, j) of a padded channels-last image into one matrix row.
template <typename T>
inline void gather_window(const T* padded_image, int64_t padded_width, int64_t C, int k, int64_t i, int64_t j,
                          T* row) {
  for (int r = 0; r < k; ++r) {
    std::memcpy(row + r * k * C, padded_image + ((i + r) * padded_width + j) * C, sizeof(T) * k * C);
  }
}

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

// Enough work per task (in multiply-adds or copied elements) that at::parallel_for's overhead stays small next to
// it. A single image's anti-diagonals are short: with 4096, C = 12 at 64×64 ran 1.9× slower on 2 threads than on 1;
// 32768 keeps such diagonals on one thread and still splits the big ones.
constexpr int64_t kMinTaskWork = 32768;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

at::Tensor to_channels_last_buffer(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).contiguous();  // (B, H, W, C)
}

at::Tensor from_channels_last_buffer(const at::Tensor& t) {
  return t.permute({0, 3, 1, 2}).contiguous();  // (B, C, H, W)
}

void check_nonsingular(const at::Tensor& weight, bool unit_diagonal) {
  if (unit_diagonal) return;
  const int64_t k = weight.size(3);
  const at::Tensor diag = weight.select(3, k - 1).select(2, k - 1).diagonal();
  TORCH_CHECK(!diag.eq(0).any().item<bool>(),
              "weight: the centre tap weight[:, :, k-1, k-1] has a zero on its diagonal, so the convolution is "
              "singular and has no inverse (its log-determinant is -inf)");
}

// ---------------------------------------------------------------------------------------------------------------
// forward

template <typename T>
at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          bool unit_diagonal) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int k = static_cast<int>(weight.size(3));
  at::Tensor y = at::empty({B, C, H, W}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const ImageStrides s{x.stride(1), x.stride(2), x.stride(3)};
  const int64_t sb = x.stride(0);
  at::parallel_for(0, B * H * W, grain_for(C * C * k * k), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(C);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / (H * W), i = (n / W) % H, j = n % W;
      for (int64_t o = 0; o < C; ++o) acc[o] = bp ? bp[o] : T(0);
      accumulate_causal_taps(w, xp + b * sb, s, C, H, W, k, unit_diagonal, i, j, true, T(1), acc.data());
      for (int64_t o = 0; o < C; ++o) yp[((b * C + o) * H + i) * W + j] = acc[o];
    }
  });
  return y;
}

template <typename T>
at::Tensor forward_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool unit_diagonal) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int k = static_cast<int>(weight.size(3));
  const int64_t Hp = H + k - 1, Wp = W + k - 1, K = k * k * C;
  at::Tensor padded = at::zeros({B, Hp, Wp, C}, x.options());
  padded.narrow(1, k - 1, H).narrow(2, k - 1, W).copy_(x.permute({0, 2, 3, 1}));
  const at::Tensor taps = tap_matrix<T>(weight, unit_diagonal, true, false);
  at::Tensor out = at::empty({B * H * W, C}, x.options());
  const int64_t chunk = std::max<int64_t>(1, kForwardGatherElements / K);
  at::Tensor windows = at::empty({std::min(chunk, B * H * W), K}, x.options());
  const T* pp = padded.data_ptr<T>();
  T* wp = windows.data_ptr<T>();
  for (int64_t start = 0; start < B * H * W; start += chunk) {
    const int64_t rows = std::min(chunk, B * H * W - start);
    at::parallel_for(0, rows, grain_for(K), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = start + r;
        const int64_t b = n / (H * W), i = (n / W) % H, j = n % W;
        gather_window(pp + b * Hp * Wp * C, Wp, C, k, i, j, wp + r * K);
      }
    });
    at::Tensor dst = out.narrow(0, start, rows);
    if (bias.has_value()) {
      at::addmm_out(dst, *bias, windows.narrow(0, 0, rows), taps);
    } else {
      at::mm_out(dst, windows.narrow(0, 0, rows), taps);
    }
  }
  return from_channels_last_buffer(out.view({B, H, W, C}));
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal) {
  check_conv_args(x, "x", weight, bias);
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  if (x.numel() == 0) return at::zeros(x.sizes(), x.options());
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cinc_forward_cpu", [&] {
    y = use_gemm(x.size(1)) ? forward_gemm<scalar_t>(x, w, bc, unit_diagonal)
                            : forward_direct<scalar_t>(x, w, bc, unit_diagonal);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// inverse and its adjoint: one wavefront, run from the top-left (inverse) or the bottom-right (adjoint)

// Pixels solved together by the interleaved substitution. One pixel at a time, the division's latency and scalar
// arithmetic bound the solve; 8 pixels interleaved and explicitly vectorised across the pixels (below) made the
// substitution alone ~4× faster at C = 48 and the whole inverse (B = 16, 32×32) 7.4 → 6.0 ms
// (benchmarks/bench_cpu_ops.py, 2-core EPYC).
constexpr int kSolveBlock = 8;

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

template <typename T>
at::Tensor wavefront_gemm(const at::Tensor& rhs, const at::Tensor& weight, bool unit_diagonal, bool adjoint) {
  const int64_t B = rhs.size(0), H = rhs.size(1), W = rhs.size(2), C = rhs.size(3);
  const int k = static_cast<int>(weight.size(3));
  const int64_t Hp = H + k - 1, Wp = W + k - 1, K = k * k * C;
  // The solution lives in a padded image so every window is in bounds. The inverse pads top-left (pixel (i, j) at
  // (i + k-1, j + k-1), window rows i…i+k-1); the adjoint pads bottom-right (pixel at (i, j), same window).
  const int64_t shift = adjoint ? 0 : k - 1;
  const Triangle<T> tri(weight, unit_diagonal, adjoint);
  const at::Tensor taps = tap_matrix<T>(weight, unit_diagonal, false, adjoint).narrow(0, adjoint ? C : 0, K - C);
  at::Tensor padded = at::zeros({B, Hp, Wp, C}, rhs.options());
  const int64_t max_rows = B * std::min(H, W);
  at::Tensor windows = at::empty({max_rows, K}, rhs.options());
  at::Tensor residual = at::empty({max_rows, C}, rhs.options());
  const T* rp = rhs.data_ptr<T>();
  T* pp = padded.data_ptr<T>();
  T* wp = windows.data_ptr<T>();
  T* resp = residual.data_ptr<T>();
  for (int64_t step = 0; step < H + W - 1; ++step) {
    const int64_t d = adjoint ? H + W - 2 - step : step;
    const Diagonal diag = diagonal(d, H, W);
    const int64_t rows = B * diag.count;
    at::parallel_for(0, rows, grain_for(K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / diag.count, i = diag.first + n % diag.count, j = d - i;
        gather_window(pp + b * Hp * Wp * C, Wp, C, k, i, j, wp + n * K);
        std::memcpy(resp + n * C, rp + ((b * H + i) * W + j) * C, sizeof(T) * C);
      }
    });
    // The centre tap multiplies the still-unknown pixel: leave its C columns (last of a causal window, first of an
    // anticausal one) out of the product rather than multiplying zeros.
    at::Tensor res = residual.narrow(0, 0, rows);
    res.addmm_(windows.narrow(0, 0, rows).narrow(1, adjoint ? C : 0, K - C), taps, /*beta=*/1, /*alpha=*/-1);
    at::parallel_for(0, rows, grain_for(C * C), [&](int64_t begin, int64_t end) {
      solve_rows(tri, resp, begin, end, C, adjoint, [&](int64_t n, const T* x) {
        const int64_t b = n / diag.count, i = diag.first + n % diag.count, j = d - i;
        std::memcpy(pp + ((b * Hp + i + shift) * Wp + j + shift) * C, x, sizeof(T) * C);
      });
    });
  }
  return padded.narrow(1, shift, H).narrow(2, shift, W);
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
  at::Tensor rhs = to_channels_last_buffer(rhs_nchw);
  if (bias.has_value()) rhs = rhs - *bias;
  const int64_t C = rhs.size(3);
  const int64_t k = w.size(3);
  const auto solve = [&](const at::Tensor& part) {
    at::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "cinc_solve_cpu", [&] {
      if (k == 1) {
        out = solve_pixels<scalar_t>(part, w, unit_diagonal, adjoint);
      } else if (use_gemm(C)) {
        out = wavefront_gemm<scalar_t>(part, w, unit_diagonal, adjoint);
      } else {
        out = wavefront_direct<scalar_t>(part, w, unit_diagonal, adjoint);
      }
    });
    return out;
  };
  const int64_t B = rhs.size(0);
  at::Tensor sol;
  if (k > 1 && B >= kBatchSplitMinImages && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // Each thread runs the whole wavefront over its own images: no barrier per anti-diagonal. Inside, the per-diagonal
    // parallel_for calls run inline and BLAS runs single-threaded.
    sol = at::empty_like(rhs);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      sol.narrow(0, begin, end - begin).copy_(solve(rhs.narrow(0, begin, end - begin)));
    });
  } else if (B * std::min(rhs.size(1), rhs.size(2)) * k * k * C * C < kSerialWavefrontWork) {
    // Too little work per anti-diagonal to pay for waking threads ~3 times per diagonal (C = 12, one 64×64 image:
    // 0.72 ms on one thread, 1.3 ms on two). The guard keeps nested parallel_for calls on this thread.
    c10::ParallelGuard serial(true);
    sol = solve(rhs);
  } else {
    sol = solve(rhs);
  }
  return from_channels_last_buffer(sol);
}

at::Tensor inverse_cpu(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal) {
  check_conv_args(y, "y", weight, bias);
  return solve_cpu(y, weight, bias, unit_diagonal, false);
}

at::Tensor inverse_transpose_cpu(const at::Tensor& g, const at::Tensor& weight, bool unit_diagonal) {
  check_conv_args(g, "g", weight, std::nullopt);
  return solve_cpu(g, weight, std::nullopt, unit_diagonal, true);
}

// ---------------------------------------------------------------------------------------------------------------
// log-determinant

at::Tensor logdet_cpu(const at::Tensor& weight, int64_t height, int64_t width, bool unit_diagonal) {
  const int k = check_logdet_args(weight, height, width);
  at::Tensor out = at::empty({}, weight.options());
  const at::Tensor w = weight.contiguous();
  const int64_t C = w.size(0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "cinc_logdet_cpu", [&] {
    double sum = 0.0;
    // Not height * width > 0: that int64 product wraps to 0 at 2^32 × 2^32.
    if (!unit_diagonal && height > 0 && width > 0) {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        sum += std::log(std::abs(static_cast<double>(wp[weight_offset(c, c, k - 1, k - 1, C, k)])));
      }
    }
    out.fill_(static_cast<double>(height) * static_cast<double>(width) * sum);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cinc, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("inverse", &inverse_cpu);
  m.impl("inverse_transpose", &inverse_transpose_cpu);
  m.impl("logdet", &logdet_cpu);
}

}  // namespace cinc
