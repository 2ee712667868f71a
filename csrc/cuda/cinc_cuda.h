// The CUDA implementations of the cinc ops (one .cu file per kind of kernel, registered in cinc_cuda_register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace cinc {
namespace cuda {

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool unit_diagonal);
at::Tensor inverse_cuda(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool unit_diagonal);
at::Tensor inverse_transpose_cuda(const at::Tensor& g, const at::Tensor& weight, bool unit_diagonal);
at::Tensor logdet_cuda(const at::Tensor& weight, int64_t height, int64_t width, bool unit_diagonal);

}  // namespace cuda
}  // namespace cinc
