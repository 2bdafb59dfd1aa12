// CUDA twins of fp_qdq.h: the MXFP / NVFP4_E5M3 tuning forward and backward over device pointers, bit for bit equal to the CPU
// kernels (the same fp32 operations in the same order, no FMA, the same code and dtype rounding). Plain C++
// declarations, no CUDA or torch headers; the stream is a cudaStream_t passed as void* and every call only enqueues
// work on it. Bad arguments throw OptionError naming `site`; a failed launch throws std::runtime_error.
#pragma once

#include <cstdint>

#include "fastround/tune/fp_qdq.h"

namespace fastround::tune {

// As fp_qdq_forward: view's tensors, qdq, exponent and the optional codes / scales are device pointers.
void fp_qdq_forward_cuda(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                         uint8_t* codes, uint8_t* scales, void* stream);

// As fp_qdq_backward: grad and the optional grad_v / grad_max / grad_x are device pointers.
void fp_qdq_backward_cuda(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                          float* grad_max, void* grad_x, void* stream);

}  // namespace fastround::tune
