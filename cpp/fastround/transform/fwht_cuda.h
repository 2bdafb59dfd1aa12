// The fast Walsh-Hadamard transform of fwht.h on the GPU: plain C++ declarations over device pointers, no CUDA or
// torch headers; the stream is a cudaStream_t passed as void*, every call only enqueues work on it (no allocation,
// no synchronisation, so it can be captured in a CUDA graph).
//
// The operator and the arithmetic are fwht.h's, in the same order for every element: F32/F16/BF16 in fp32 (half
// types loaded exactly, stored with RNE), F64 in fp64; signs_first signs; butterfly stages with strides 1, 2, ...,
// 2^(m-1), each (a, b) -> (a + b, a - b); the K stage as sum over k' in increasing order starting from 0; one
// multiplication by c = 1/sqrt(n) rounded to the compute type; the trailing signs. Every operation is one correctly
// rounded IEEE add, subtract or multiply (the __fadd_rn family: no FMA contraction whatever the flags), so the result
// equals fwht_rows bit for bit. Only the distribution of independent elements over threads differs.
//
// Layout: each n-block of a row is one smem tile (small blocks: several per tile). Each thread owns 8 consecutive
// elements: strides 1, 2, 4 in registers, 8 ... 128 by warp shuffles, 256 and up as radix-8/4/2 passes through
// shared memory, the K stage read from shared memory as a small dense ±1 product.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/transform/fwht.h"

namespace fastround::transform::gpu {

// Largest block length n the kernel takes for `dtype` on the current device: the n-block's compute-type copy must
// fit the block's opt-in shared memory (H100/H200: 227 KiB, so 58112 fp32 / 29056 fp64 elements, before rounding
// down to a tile).
int64_t fwht_cuda_max_block(DType dtype);

// Device scratch bytes fwht_rows_cuda wants for this call (0: none). A power-of-two n-block from 4096 in a call of at
// most 8 of them (a decode row: QuaRot's R1) runs on sm_90 as one launch of a thread-block cluster per n-block, the
// blocks exchanging their chunks through distributed shared memory, and needs none (FASTROUND_FWHT_CLUSTER=0 turns
// it off). Otherwise a K > 1 transform of few n-blocks runs as two kernels, the butterflies into scratch ([rows,
// cols] in the compute type) and the K stage spread over the GPU, instead of one thread block walking it all; a
// power-of-two n-block (n >= 32768) of a call with at most 8 of them likewise runs its low stages per n/8-long chunk
// (one thread block each) into scratch and its last three strides across the chunks in a second kernel. The bits
// are the same whichever plan runs.
int64_t fwht_cuda_scratch_bytes(DType dtype, int64_t rows, int64_t cols, const FwhtSpec& spec);

// x [rows, cols] of `dtype` (device) -> y [rows, cols] of `dtype` (device; may equal x: the transform is in place
// then). scratch: fwht_cuda_scratch_bytes(...) device bytes, 16-byte aligned, not overlapping x or y, or null (the
// one-kernel plan). spec.hadk ([k, k] int8) and spec.signs ([n] int8) are device pointers. fwht_check's rules, with the ±1
// entries not read (they live on the device): the caller checks them where it can; any other value acts as its sign.
// Throws OptionError for bad arguments (naming `site`) and std::runtime_error when a launch fails.
void fwht_rows_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t cols, const FwhtSpec& spec,
                    void* stream, const char* site = "fwht_rows_cuda", void* scratch = nullptr);

}  // namespace fastround::transform::gpu
