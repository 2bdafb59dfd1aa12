// The woq kernels' per-ISA table (woq_kernels.inc compiled by woq_gemm_avx2.cpp and woq_gemm_avx512.cpp); only
// woq_gemm.cpp calls it.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/infer/woq_layout.h"

namespace fastround::infer::detail {

// x as the GEMV kernels read it: [m, ld] fp32, zero past `in` (ld covers every input a qweight row packs), and
// xsum [m, groups] the fp32 sum of each group's inputs.
struct GemvCtx {
  const float* x = nullptr;
  int64_t ld = 0;
  const float* xsum = nullptr;
  int64_t m = 0;
};

struct WoqKernels {
  // Outputs per vector block (a block starts at a multiple of it), or 0 when this layer is not served.
  int64_t (*block_outputs)(const WoqWeightView& w);
  // y [m, out] += the contribution of groups [g0, g1) to outputs [o0, o0 + block_outputs).
  void (*gemv_block)(const WoqWeightView& w, const GemvCtx& c, int64_t o0, int64_t g0, int64_t g1, float* y);
  // dst [out, in] in F32 or BF16, in parallel; false when this layer is not served (nothing written).
  bool (*dequantize)(const WoqWeightView& w, DType dtype, void* dst);
};

// bf16 activations on CPUs with AVX512_BF16, GPTQ 2/4-bit words: the codes become bf16 pairs (128 + q, exact)
// multiplied by pairs of x with vdpbf16ps, 32 products per instruction, exact products summed in fp32. xpair
// [m, ld/2] holds x's bf16 bits of inputs (8w + j, 8w + j + pf/2) of word w in one uint32 (pf = 32/bits).
struct GemvBf16Ctx {
  const uint32_t* xpair = nullptr;
  int64_t ld2 = 0;
  const float* xsum = nullptr;
  int64_t m = 0;
};
// Outputs per block of gptq_bf16_block (as kWoqAvx512's GPTQ block_outputs), or 0 when the CPU lacks AVX512_BF16.
int64_t gptq_bf16_block_outputs(const WoqWeightView& w);
void gptq_bf16_block(const WoqWeightView& w, const GemvBf16Ctx& c, int64_t o0, int64_t g0, int64_t g1, float* y);

// GPTQ words to dst [out, in] 16 inputs of one output per store (AVX-512); false when the layer is not served
// (AWQ, groups or out_features not multiples of 16): nothing written.
bool gptq_dequantize_avx512(const WoqWeightView& w, DType dtype, void* dst);

extern const WoqKernels kWoqAvx2;
extern const WoqKernels kWoqAvx512;

}  // namespace fastround::infer::detail
