// Weight-only-quantized linear layers on CUDA: y = x · dequant(W) (+ bias) straight from the packed GPTQ / AWQ
// tensors that checkpoints store. Plain C++ declarations over device pointers, no CUDA or torch headers: dtypes are
// fastround::DType codes, the stream is a cudaStream_t passed as void*, every call only enqueues work on it.
// Bad arguments throw OptionError naming the site; a failed launch throws std::runtime_error.
//
// The tensors and their checks are those of the CPU op (infer/woq_layout.h), which owns the schema; this header
// stays apart from it (namespace gpu) so that the CUDA library needs none of the CPU kernels.
// Dequantization, for input k, output n, group g = k / group:  w[k, n] = scale[g, n] * (q[k, n] - zero[g, n])
//   gptq     qweight [>= ceil(in*bits/32), out] int32 (packers may pad inputs to whole groups), lane j of word
//            (i, n) holds q[i*32/bits + j, n], lane 0 in the low bits; qzeros [groups, ceil(out*bits/32)] int32,
//            lanes along out the same way, storing zero - 1
//            (GPTQ v1: auto_gptq and auto_round's sym packing, pack_gptq with zero_offset 1)
//   gptq_v2  as gptq, qzeros storing the zero itself (auto_round asym, gptqmodel v2)
//   awq      4 bits only: qweight [in, out/8] int32, nibble slot kAwqOrder[p] of word (k, w) holds
//            q[k, 8w + p] (pack_awq.h); qzeros [groups, out/8] the zero points as is, same interleave
//   scales   [groups, out] fp16 / bf16 (fp32 too on the dequantize path)
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround::infer::gpu {

enum class WoqLayout : int { Gptq = 0, GptqV2 = 1, Awq = 2 };

// The packed tensors of one layer, on the device.
struct WoqWeights {
  WoqLayout layout = WoqLayout::Gptq;
  int bits = 4;                     // 2, 4 or 8 (awq: 4)
  int64_t in = 0, out = 0;          // K, N
  int64_t group = 0;                // inputs per group, the last group may be partial (per channel: in)
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const void* scales = nullptr;
  DType scale_dtype = DType::F16;
  int64_t groups() const { return group > 0 ? (in + group - 1) / group : 0; }
};

// Checks the sizes and bits of `w` (not the pointers' shapes, which the caller owns); throws OptionError.
void woq_check(const WoqWeights& w, const char* site);

// Largest batch the GEMV takes; larger ones go through woq_dequantize_cuda and a matmul.
inline constexpr int64_t kWoqGemvMaxRows = 8;

// Whether woq_gemv_cuda serves x [m, in] of dtype x_dtype at these addresses: m <= kWoqGemvMaxRows, x fp16 or
// bf16, scales fp16 or bf16, 16-byte aligned rows, out a multiple of 4 (gptq) or 32 (awq), and a group
// that is a multiple of one word's inputs (gptq, with in a multiple of it too). Everything else takes the
// dequantize path.
bool woq_gemv_supported(const WoqWeights& w, DType x_dtype, int64_t m, const void* x);

// out [m, out] = x [m, in] · dequant(W) + bias [out], x and out in x_dtype, fp32 accumulation; bias may be null,
// else in x_dtype or F32 (bias_dtype), added in fp32 before the one rounding to x_dtype. Reads the packed weight
// once; split-K across a thread-block cluster when the column tiles alone cannot fill the GPU. Requires
// woq_gemv_supported.
// Benchmark knobs of the GEMV (0: the built-in choice). kernel: which GEMV takes GPTQ words, at any batch: rows
// (each thread a private run of qweight rows; every layout and bits) or staged (activations staged in shared
// memory, chunks of rows per warp; GPTQ 4 bits, and 8 bits at batch 1; the built-in choice where it applies).
// The rest apply at batch 1 only. unroll: qweight loads a thread has in flight before it uses any (rows: 2, 4, 8
// or 16; staged: 4, 8 or 16 rows per chunk); split: blocks per cluster along the inputs (rows: 1..8, rounded down
// to a power of two the device admits; staged: 1, 2, 4 or 8); tx (staged): lanes per row worker, 32, 16 or 8
// (4 columns each); prefetch (staged): 1 off, 2 on (the next chunk's loads issued before the current is used). A staged setting the problem cannot take (a chunk straddling a group, a cluster or activation
// slice the device refuses) leaves the call to the rows kernel's defaults.
// staged_half2: the staged kernel with its products in x's half2 arithmetic (fewer instructions per code, products
// rounded to x's dtype), at batch 1 and 4 bits; elsewhere the built-in choice. Takes unroll, split and tx.
// mma: the tensor-core GEMV (mma.sync m16n8k16, sm_80+), gptq and gptq_v2 at 4 bits, batches 1..8, x fp16 or bf16,
// in and group multiples of 32; products exact, sums in fp32 (the tensor cores' accumulation, not IEEE
// round-to-nearest at every add). Elsewhere (awq, 2 or 8 bits, group or in not a multiple of 32, pre-sm_80) the
// built-in choice, as half2. Takes unroll (4 or 8 steps of 4 qweight rows
// in flight per warp) and split; never fuses a rotation (woq_gemv_fuses_hadamard is false; rot throws OptionError).
enum class WoqGemvKernel : int { Auto = 0, Rows = 1, Staged = 2, StagedHalf2 = 3, Mma = 4 };

struct WoqGemvTuning {
  WoqGemvKernel kernel = WoqGemvKernel::Auto;
  int unroll = 0;
  int split = 0;
  int tx = 0;
  int prefetch = 0;
};

// An online rotation of x's rows that the GEMV can apply as it reads x (a rotated checkpoint's input rotation, fused
// into woq_linear_rotated): per n-block of inputs, the signs (if any) before or after the Sylvester FWHT, scaled by
// 1/sqrt(n), rounded to x's dtype; the bits of fwht_rows_cuda (transform/fwht_cuda.h) with FwhtSpec{n, k = 1,
// signs, signs_first, normalize}. n: a power of two up to 256; signs: [n] int8 on the device (> 0: +1), or null.
struct WoqInputHadamard {
  int64_t n = 0;
  const int8_t* signs = nullptr;
  bool signs_first = false;
};

// Whether woq_gemv_cuda takes `rot` for this problem and tuning: the GEMV it plans is the staged kernel at 4 bits
// (gptq layouts, 1..4 rows, not the half2 or mma variant) and n divides every thread block's slice of the inputs (whole
// chunks of the plan). Otherwise the caller rotates x first (fwht_rows_cuda) and calls without `rot`.
bool woq_gemv_fuses_hadamard(const WoqWeights& w, DType x_dtype, int64_t m, const void* x,
                             const WoqInputHadamard& rot, const WoqGemvTuning& tune = {});

// rot (null: none; else requires woq_gemv_fuses_hadamard): x is the unrotated input, and out the bits of the GEMV
// of the rotated one, in one launch.
void woq_gemv_cuda(const WoqWeights& w, DType x_dtype, const void* x, int64_t m, const void* bias, DType bias_dtype,
                   void* out, void* stream, WoqGemvTuning tune = {}, const WoqInputHadamard* rot = nullptr);

// dst [in, out] (row-major, input-major as a matmul's right operand) = dequant(W) rounded to out_dtype
// (F32, F16 or BF16). Any layout, bits, group and scale dtype woq_check accepts.
void woq_dequantize_cuda(const WoqWeights& w, DType out_dtype, void* dst, void* stream);

}  // namespace fastround::infer::gpu
