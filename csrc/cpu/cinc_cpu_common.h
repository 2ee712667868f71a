// What the CPU kernels of the CInC convolution (docs/spec.md §1) share: the choice of schedule, the grain of parallel
// work, and the tap micro-kernel of the tiled schedules. The ops are in cinc_cpu_forward.cpp (forward),
// cinc_cpu_wavefront.cpp (inverse and its adjoint) and cinc_cpu_logdet.cpp, registered in cinc_cpu_register.cpp.
//
// Two schedules:
//  * tiled (the default): a register-blocked micro-kernel computes the tap sums of 8 pixels × one vector of output
//    channels straight from a zero-padded channels-last image; the solves substitute those 8 pixels together.
//  * direct (CINC_CPU_SCHEDULE=direct): one task per pixel runs cinc_math.h's tap loop and channel substitution; the
//    independent one-pixel implementation the tests compare the tiled one with.
// Both keep the working image channels-last (B, H, W, C), so a pixel's channels and a window row's k·C values are
// contiguous; results are returned as contiguous NCHW tensors.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cinc_math.h"

namespace cinc {
namespace cpu {

// Pixels solved together by the interleaved substitution, and the pixels of one micro-kernel call. One pixel at a
// time, the division's latency and scalar arithmetic bound the solve; interleaving several hides the latency and
// vectorises across the pixels (benchmarks/results/cpu_ops.md).
constexpr int kSolveBlock = 8;

// The per-pixel schedule (the tap loop and substitution of cinc_math.h, one pixel per task) is slower than the
// tiled one at every benchmarked shape (benchmarks/results/cpu_ops.md); it stays as the independent one-pixel
// implementation the tests compare the tiled one with, chosen by CINC_CPU_SCHEDULE=direct (read at every call).
inline bool use_direct_schedule() {
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

// Enough work per task (in multiply-adds or copied elements) that at::parallel_for's overhead stays small next to
// it. A single image's anti-diagonals are short: a smaller grain wakes threads for diagonals too short to repay them,
// and this one still splits the long ones (benchmarks/results/cpu_ops.md, 1 and 2 threads).
constexpr int64_t kMinTaskWork = 32768;

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
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
inline int max_vector_bytes() {
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

}  // namespace cpu
}  // namespace cinc
