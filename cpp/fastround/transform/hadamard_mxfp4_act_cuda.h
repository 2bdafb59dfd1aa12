// The fused Hadamard + MXFP4 activation qdq of hadamard_mxfp4_act.h on the GPU: plain C++ declarations over device
// pointers, no CUDA or torch headers; the stream is a cudaStream_t passed as void*, a call only enqueues work on it
// (no allocation, no synchronisation: capturable in a CUDA graph).
//
// One warp per 32-group, one element per lane: the butterflies of strides 1 .. len/2 by warp shuffles in the
// reference's order ((a, b) -> (a + b, a - b) with a the lower element), the K stage as a ±1 sum over shuffled
// values in increasing k' (a dense block matrix is K = n), the scaling by c and the signs as fwht.h orders them, the group maximum by shuffles (max is exact in any order), then the scale and the qdq through
// the same inline functions as the CPU. Every operation is one correctly rounded IEEE operation (__fadd_rn family),
// so the result equals hadamard_mxfp4_act_rows bit for bit.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/transform/fwht.h"

namespace fastround::transform::gpu {

// x, y [rows, cols] of `dtype` (F32, F16, BF16; device; y may be x). spec: n = K · 2^m a power of two up to 32
// (the MX rotation block; the CPU kernel takes the rest); spec.hadk ([k, k] int8) and spec.signs ([n] int8) are
// device pointers, each entry taken by its sign. cols a multiple of 32. Throws OptionError naming `site` and the option for bad arguments,
// std::runtime_error when the launch fails.
void hadamard_mxfp4_act_rows_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t cols,
                                  const FwhtSpec& spec, void* stream, const char* site = "hadamard_mxfp4_act_rows_cuda");

// Whether the CUDA kernel takes this rotation (n a power of two <= 32 split as K · 2^m, hadk given when K > 1).
bool hadamard_mxfp4_act_cuda_supports(const FwhtSpec& spec);

}  // namespace fastround::transform::gpu
