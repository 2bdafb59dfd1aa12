// CUDA twins of int_qdq.h and sign_sgd.h: the same forward, backward, group extremes and sign-SGD step over
// device pointers, bit for bit equal to the CPU kernels (same fp32 operations in the same order, no FMA, the
// same fp16/bf16 rounding helpers, per-group sums taken sequentially). Plain C++ declarations, no CUDA or torch
// headers: dtypes are fastround::DType codes, the stream is a cudaStream_t passed as void*, and every call only
// enqueues work on it. Bad arguments throw OptionError naming `site`; a failed launch throws std::runtime_error.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/tune/int_qdq.h"
#include "fastround/tune/sign_sgd.h"

namespace fastround::tune {

// As int_qdq_forward: view's tensors, qdq, scale and the optional codes / zeros are device pointers.
void int_qdq_forward_cuda(const IntQdqView& view, const IntQdqParams& params, void* qdq, float* scale,
                          uint8_t* codes, int32_t* zeros, void* stream);

// As int_qdq_backward: grad [rows, cols] in view.dtype; grad_v and the optional grad_min / grad_max on the device.
void int_qdq_backward_cuda(const IntQdqView& view, const IntQdqParams& params, const void* grad, float* grad_v,
                           float* grad_min, float* grad_max, void* stream);

// As int_group_extremes, on device pointers.
void int_group_extremes_cuda(DType dtype, const void* weight, int64_t rows, int64_t cols, int64_t group,
                             int64_t groups, float* wmin, float* wmax, void* stream);

// As sign_sgd_step on each of tensors[0, count): a host array of device pointers, stepped in as few launches as
// the list allows.
void sign_sgd_step_cuda(const SignSgdTensor* tensors, int64_t count, const SignSgdParams& params, void* stream);

}  // namespace fastround::tune
