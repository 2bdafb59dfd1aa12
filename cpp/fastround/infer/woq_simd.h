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
  // dst [in, out] in F32 or BF16, in parallel; false when this layer is not served (nothing written).
  bool (*dequantize)(const WoqWeightView& w, DType dtype, void* dst);
};

extern const WoqKernels kWoqAvx2;
extern const WoqKernels kWoqAvx512;

}  // namespace fastround::infer::detail
