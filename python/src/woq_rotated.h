// woq_linear_rotated's device-independent implementation (bind_woq_torch.cpp): hadamard_transform then woq_linear,
// through the dispatcher. The CUDA kernel (bind_woq_cuda.cpp) runs it wherever it cannot fuse the rotation.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace fastround_torch {

at::Tensor woq_linear_rotated_two_ops(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                      const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t bits,
                                      int64_t group_size, c10::string_view layout, int64_t block_size,
                                      const std::optional<at::Tensor>& hadamard_k,
                                      const std::optional<at::Tensor>& signs, bool transpose, bool signs_first);

}  // namespace fastround_torch
