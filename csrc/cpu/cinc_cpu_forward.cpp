// The forward y = M x + bias on the CPU (docs/spec.md §1): the tap micro-kernel of cinc_cpu_common.h over the pixels
// in raster order (tiled), or cinc_math.h's tap loop one pixel per task (direct).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cpu.h"
#include "cinc_cpu_common.h"

namespace cinc {
namespace cpu {
namespace {

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

}  // namespace

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

}  // namespace cpu
}  // namespace cinc
