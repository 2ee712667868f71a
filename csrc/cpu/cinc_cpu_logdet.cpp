// The log-determinant H·W·Σ_c log|L[c, c]| on the CPU (docs/spec.md §1), summed in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>

#include "../cinc_checks.h"
#include "../cinc_math.h"
#include "cinc_cpu.h"

namespace cinc {
namespace cpu {

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

}  // namespace cpu
}  // namespace cinc
