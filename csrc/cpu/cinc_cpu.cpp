// CPU kernels of the CInC convolution (docs/spec.md §1): forward, wavefront inverse, its adjoint, log-determinant.
//
// Two schedules:
//  * tiled (the default): a register-blocked micro-kernel computes the tap sums of 8 pixels × one vector of output
//    channels straight from a zero-padded channels-last image; the solves substitute those 8 pixels together.
//  * direct (CINC_CPU_SCHEDULE=direct): one task per pixel runs cinc_math.h's tap loop and channel substitution; the
//    independent one-pixel implementation the tests compare the tiled one with.
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

// Below this many multiply-adds on the longest anti-diagonal, a wavefront over few images runs on one thread.
constexpr int64_t kSerialWavefrontWork = int64_t(1) << 20;

// With at least this many images, threads split the batch instead of each anti-diagonal (see solve_cpu).
constexpr int64_t kBatchSplitMinImages = 2;

// Pixels solved together by the interleaved substitution. One pixel at a time, the division's latency and scalar
// arithmetic bound the solve; 8 pixels interleaved and explicitly vectorised across the pixels (below) made the
// substitution alone ~4× faster at C = 48 and the whole inverse (B = 16, 32×32) 7.4 → 6.0 ms
// (benchmarks/bench_cpu_ops.py, 2-core EPYC).
constexpr int kSolveBlock = 8;

// The per-pixel schedule (the tap loop and substitution of cinc_math.h, one pixel per task) is slower than the
// tiled one at every benchmarked shape (benchmarks/results/cpu_ops.md); it stays as the independent one-pixel
// implementation the tests compare the tiled one with, chosen by CINC_CPU_SCHEDULE=direct (read at every call).
bool use_direct_schedule() {
  const char* env = std::getenv("CINC_CPU_SCHEDULE");
  return env != nullptr && std::strcmp(env, "direct") == 0;
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

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
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

// ---------------------------------------------------------------------------------------------------------------
// The tap micro-kernel of the tiled schedules: the tap sums of kSolveBlock pixels × one vector of output channels,
// held in registers, read straight from a padded channels-last image (each window row is k·C contiguous values).

// Element vectors of 16, 32 and 64 bytes (GCC/Clang vector extensions), aligned to their size.
typedef float Float4 __attribute__((vector_size(16)));
typedef float Float8v __attribute__((vector_size(32)));
typedef float Float16 __attribute__((vector_size(64)));
typedef double Double2 __attribute__((vector_size(16)));
typedef double Double4v __attribute__((vector_size(32)));
typedef double Double8 __attribute__((vector_size(64)));

// What the micro-kernel of one block reads: the window's top-left corner of each pixel in the padded solution and
// the taps as a (k²C, padded_channels) row-major matrix (zero in the padding columns and the centre block).
template <typename T>
struct TapSums {
  const T* taps;
  int64_t channels;         // C
  int64_t padded_channels;  // C rounded up to the vector width: every tap row is whole aligned vectors
  int64_t row_stride;       // elements between two rows of a padded image
  int k;
  bool anticausal;          // the centre tap is the window's first pixel (adjoint) rather than its last
  bool with_centre;         // include the centre pixel (the forward) or leave it out (the solves)
};

// sums[p·Cp + o] = Σ_{window entries e} corner[p][e] · taps[e, o] for the kSolveBlock pixels, over the whole window
// or all of it but the centre pixel.
template <typename T, typename V>
__attribute__((always_inline)) inline void tap_sums_block(const TapSums<T>& ts, const T* const* corner, T* sums) {
#if defined(__clang__)
#pragma clang fp contract(fast)
#endif
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  const int64_t C = ts.channels, Cp = ts.padded_channels, kC = ts.k * ts.channels;
  for (int64_t v = 0; v < Cp; v += kLanes) {
    V acc[kSolveBlock];
    for (int p = 0; p < kSolveBlock; ++p) acc[p] = V{};
    for (int r = 0; r < ts.k; ++r) {
      const int64_t begin = (!ts.with_centre && ts.anticausal && r == 0) ? C : 0;
      const int64_t end = (!ts.with_centre && !ts.anticausal && r == ts.k - 1) ? kC - C : kC;
      const T* t = ts.taps + r * kC * Cp + v;
      const int64_t offset = r * ts.row_stride;
      for (int64_t e = begin; e < end; ++e) {
        const V tv = *reinterpret_cast<const V*>(t + e * Cp);
        for (int p = 0; p < kSolveBlock; ++p) acc[p] += corner[p][offset + e] * tv;
      }
    }
    for (int p = 0; p < kSolveBlock; ++p) *reinterpret_cast<V*>(sums + p * Cp + v) = acc[p];
  }
}

template <typename T>
using TapSumsFn = void (*)(const TapSums<T>&, const T* const*, T*);

// The micro-kernel is the one place where fused multiply-adds are wanted (the substitution must not contract, see
// solve_block_by_rows), so it lives in its own functions built with contraction on, one per instruction set.
#if defined(__clang__)
#define CINC_CONTRACT
#else
#define CINC_CONTRACT __attribute__((optimize("fp-contract=fast")))
#endif

template <typename T, typename V>
CINC_CONTRACT void tap_sums_baseline(const TapSums<T>& ts, const T* const* corner, T* sums) {
  tap_sums_block<T, V>(ts, corner, sums);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <typename T, typename V>
__attribute__((target("avx2,fma"))) CINC_CONTRACT void tap_sums_avx2(const TapSums<T>& ts, const T* const* corner,
                                                                     T* sums) {
  tap_sums_block<T, V>(ts, corner, sums);
}

template <typename T, typename V>
__attribute__((target("avx512f"))) CINC_CONTRACT void tap_sums_avx512(const TapSums<T>& ts, const T* const* corner,
                                                                      T* sums) {
  tap_sums_block<T, V>(ts, corner, sums);
}
#endif

// The widest vectors this CPU runs well (64 bytes with AVX-512, 32 with AVX2 and FMA, else 16).
// CINC_CPU_MAX_VECTOR_BYTES=16|32 caps it (read at every call), so that the tests run the narrower builds too.
int max_vector_bytes() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const int cpu = __builtin_cpu_supports("avx512f")                                     ? 64
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 32
                                                                                               : 16;
#else
  const int cpu = 16;
#endif
  const char* env = std::getenv("CINC_CPU_MAX_VECTOR_BYTES");
  if (env == nullptr || *env == '\0') return cpu;
  const int cap = std::atoi(env);
  return cap >= 64 ? cpu : cap >= 32 ? std::min(cpu, 32) : 16;
}

// The vector width for C output channels: fewest vector operations per tap, a 64-byte one counted as two 32-byte
// ones (AMD Zen 4 splits them; on CPUs that do not, this only gives up some speed at C = 24-like sizes), ties to
// the wider. C = 12 → 16 floats, 24 → 8, 48 → 16, 4 → 4.
template <typename T>
int vector_bytes_for(int64_t C) {
  int best = 16;
  int64_t best_cost = -1;
  for (int bytes = max_vector_bytes(); bytes >= 16; bytes /= 2) {
    const int64_t lanes = bytes / static_cast<int64_t>(sizeof(T));
    const int64_t cost = (C + lanes - 1) / lanes * (bytes == 64 ? 2 : 1);
    if (best_cost < 0 || cost < best_cost) {
      best = bytes;
      best_cost = cost;
    }
  }
  return best;
}

template <typename T, typename V>
TapSumsFn<T> tap_sums_for_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (max_vector_bytes() == 64) return &tap_sums_avx512<T, V>;
  if (max_vector_bytes() == 32) return &tap_sums_avx2<T, V>;
#endif
  return &tap_sums_baseline<T, V>;
}

template <typename T>
TapSumsFn<T> tap_sums_kernel(int bytes) {
  using V16 = std::conditional_t<std::is_same_v<T, float>, Float4, Double2>;
  using V32 = std::conditional_t<std::is_same_v<T, float>, Float8v, Double4v>;
  using V64 = std::conditional_t<std::is_same_v<T, float>, Float16, Double8>;
  if (bytes == 64) return tap_sums_for_isa<T, V64>();
  if (bytes == 32) return tap_sums_for_isa<T, V32>();
  return tap_sums_for_isa<T, V16>();
}

// Memory that vectors of up to 64 bytes may be loaded from at any multiple of their size.
template <typename T>
struct AlignedBuffer {
  std::vector<T> storage;
  T* data;
  explicit AlignedBuffer(int64_t n) : storage(n + 64 / sizeof(T)) {
    data = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(storage.data()) + 63) & ~std::uintptr_t(63));
  }
};

// The taps of tap_matrix with every row padded with zeros to whole vectors of the width chosen for C.
template <typename T>
struct VectorTaps {
  int bytes;
  int64_t padded_channels;
  AlignedBuffer<T> buffer;
  VectorTaps(const at::Tensor& weight, bool unit_diagonal, bool with_centre, bool anticausal)
      : bytes(vector_bytes_for<T>(weight.size(0))),
        padded_channels(round_up(weight.size(0), bytes / static_cast<int64_t>(sizeof(T)))),
        buffer(weight.size(0) * weight.size(3) * weight.size(3) * padded_channels) {
    const int64_t C = weight.size(0), K = C * weight.size(3) * weight.size(3);
    const at::Tensor taps = tap_matrix<T>(weight, unit_diagonal, with_centre, anticausal);
    std::fill(buffer.data, buffer.data + K * padded_channels, T(0));
    for (int64_t e = 0; e < K; ++e) {
      std::copy(taps.data_ptr<T>() + e * C, taps.data_ptr<T>() + (e + 1) * C, buffer.data + e * padded_channels);
    }
  }
  TapSums<T> sums(int64_t C, int64_t row_stride, int k, bool anticausal, bool with_centre) const {
    return TapSums<T>{buffer.data, C, padded_channels, row_stride, k, anticausal, with_centre};
  }
};

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

// The forward on the tap micro-kernel: blocks of kSolveBlock consecutive pixels (raster order over the batch) read
// from a zero-padded channels-last copy of x.
template <typename T>
at::Tensor forward_tiled(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         bool unit_diagonal) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int k = static_cast<int>(weight.size(3));
  const int64_t Hp = H + k - 1, Wp = W + k - 1;
  at::Tensor padded = at::zeros({B, Hp, Wp, C}, x.options());
  padded.narrow(1, k - 1, H).narrow(2, k - 1, W).copy_(x.permute({0, 2, 3, 1}));
  const VectorTaps<T> taps(weight, unit_diagonal, true, false);
  const TapSums<T> ts = taps.sums(C, Wp * C, k, false, true);
  const TapSumsFn<T> kernel = tap_sums_kernel<T>(taps.bytes);
  const int64_t Cp = taps.padded_channels;
  at::Tensor y = at::empty({B, C, H, W}, x.options());
  const T* pp = padded.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t pixels = B * HW;
  const int64_t blocks = (pixels + kSolveBlock - 1) / kSolveBlock;
  at::parallel_for(0, blocks, grain_for(kSolveBlock * k * k * C * C), [&](int64_t begin, int64_t end) {
    AlignedBuffer<T> sums(kSolveBlock * Cp);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kSolveBlock;
      const int count = static_cast<int>(std::min<int64_t>(kSolveBlock, pixels - n0));
      const T* corner[kSolveBlock];
      T* result[kSolveBlock];
      int64_t b = n0 / HW, i = (n0 / W) % H, j = n0 % W;
      for (int p = 0; p < kSolveBlock; ++p) {
        corner[p] = pp + ((b * Hp + i) * Wp + j) * C;  // the window of (i, j) starts at padded (i, j)
        result[p] = yp + b * C * HW + i * W + j;
        if (p + 1 < count && ++j == W) {  // a short last block repeats its last pixel
          j = 0;
          if (++i == H) {
            i = 0;
            ++b;
          }
        }
      }
      kernel(ts, corner, sums.data);
      for (int p = 0; p < count; ++p) {
        const T* sum = sums.data + p * Cp;
        for (int64_t o = 0; o < C; ++o) result[p][o * HW] = bp != nullptr ? sum[o] + bp[o] : sum[o];
      }
    }
  });
  return y;
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal) {
  check_conv_args(x, "x", weight, bias);
  const at::Tensor w = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  if (x.numel() == 0) return at::zeros(x.sizes(), x.options());
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cinc_forward_cpu", [&] {
    y = use_direct_schedule() ? forward_direct<scalar_t>(x, w, bc, unit_diagonal)
                              : forward_tiled<scalar_t>(x, w, bc, unit_diagonal);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// inverse and its adjoint: one wavefront, run from the top-left (inverse) or the bottom-right (adjoint)

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
