// Argument checks shared by the backends. The Python front end checks the same things first with friendlier
// messages; these keep a direct torch.ops.cinc.* call from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/core/ScalarType.h>

namespace cinc {

// A (C, C, k, k) weight with 1 <= k <= 7 and a floating dtype; returns k. Every op calls this before it reads the
// weight: the centre tap sits at [k-1, k-1], so k = 0 would index before the buffer.
inline int check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (C, C, k, k), got ", weight.dim(), "-D");
  TORCH_CHECK(weight.size(0) == weight.size(1), "weight must be square over channels (C, C, k, k), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) == weight.size(3), "weight must have a square k×k kernel, got ", weight.sizes());
  const int64_t k = weight.size(3);
  TORCH_CHECK(k >= 1 && k <= 7, "weight: kernel size k must be in 1…7, got ", k);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must have a floating-point dtype, got ",
              weight.scalar_type());
  return static_cast<int>(k);
}

// The log-determinant's arguments: a valid weight and an image size that is not negative.
inline int check_logdet_args(const at::Tensor& weight, int64_t height, int64_t width) {
  const int k = check_weight(weight);
  TORCH_CHECK(height >= 0, "height must be >= 0, got ", height);
  TORCH_CHECK(width >= 0, "width must be >= 0, got ", width);
  return k;
}

inline int check_conv_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4, x_name, " must be 4-D (B, C, H, W), got ", x.dim(), "-D");
  const int64_t k = check_weight(weight);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.size(0) == C, "weight must be (C, C, k, k) with C = ", C, " (the channels of ", x_name,
              "), got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "weight dtype ", weight.scalar_type(),
              " does not match ", x_name, " dtype ", x.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "weight is on ", weight.device(), " but ", x_name, " is on ",
              x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "bias must be (C,) with C = ", C, ", got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(), " does not match ",
                x_name, " dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias is on ", bias->device(), " but ", x_name, " is on ",
                x.device());
  }
  return static_cast<int>(k);
}

}  // namespace cinc
