// The CPU implementations of the cinc ops (one .cpp file per kind of kernel, registered in cinc_cpu_register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace cinc {
namespace cpu {

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal);
at::Tensor inverse_cpu(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool unit_diagonal);
at::Tensor inverse_transpose_cpu(const at::Tensor& g, const at::Tensor& weight, bool unit_diagonal);
at::Tensor logdet_cpu(const at::Tensor& weight, int64_t height, int64_t width, bool unit_diagonal);

}  // namespace cpu
}  // namespace cinc
