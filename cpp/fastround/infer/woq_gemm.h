// Weight-only-quantized linear on the CPU: y = x @ dequant(W)^T + bias over the packed words of woq_layout.h.
// Two fast paths beside the scalar reference:
//   woq_gemv        few rows (decode): streams the packed words once per MR rows of x, unpacks them in vector
//                   registers and accumulates sum(x*q) per group in fp32, then y += s * (that - z * sum(x)).
//   woq_dequantize  many rows (prefill): the weight [out, in] in fp32 or bf16, for a matmul by the caller.
// Results of the fast paths equal the reference to fp32 rounding (sums in another order), not bit for bit.
#pragma once

#include <cstdint>

#include "fastround/common/cpu.h"
#include "fastround/common/dtype.h"
#include "fastround/infer/woq_layout.h"

namespace fastround::infer {

// One call's activations and output: x [m, in] and y [m, out] row-major in `dtype` (F32, F16 or BF16); bias
// [out] fp32 or null.
struct WoqGemvArgs {
  DType dtype = DType::F32;
  int64_t m = 0;
  const void* x = nullptr;
  const float* bias = nullptr;
  void* y = nullptr;
};

// Element by element in fp32: y[r, o] = sum_k x[r, k] * woq_weight(k, o) in k order, + bias, rounded to dtype.
void woq_linear_ref(const WoqWeightView& w, const WoqGemvArgs& a);

// The GEMV path on the kernels of `isa` (Scalar: the same per-group algorithm in plain C++). Work is split
// over output blocks and, for layers with few of them, over groups, by the layer's shape alone, so the result does
// not depend on the thread count. Throws OptionError for an ISA the CPU lacks.
void woq_gemv(const WoqWeightView& w, const WoqGemvArgs& a, Isa isa);
inline void woq_gemv(const WoqWeightView& w, const WoqGemvArgs& a) { woq_gemv(w, a, active_isa()); }

// dst [out, in] row-major (nn.Linear's layout) = woq_weight(k, o) rounded to dtype (F32 or BF16, RNE): what the
// GEMM path multiplies.
void woq_dequantize_ref(const WoqWeightView& w, DType dtype, void* dst);
void woq_dequantize(const WoqWeightView& w, DType dtype, void* dst, Isa isa);
inline void woq_dequantize(const WoqWeightView& w, DType dtype, void* dst) {
  woq_dequantize(w, dtype, dst, active_isa());
}

// Whether woq_gemv runs vector kernels for this layer on `isa` (else its per-element scalar code: the caller
// should prefer woq_dequantize + a matmul). GPTQ needs group_size a multiple of 32/bits.
bool woq_gemv_fast(const WoqWeightView& w, Isa isa);

// Rows of x up to which the GEMV path beats dequantize-and-matmul (benchmarks/woq_linear.py measures it).
inline constexpr int64_t kWoqGemvMaxRows = 16;

// The ISA the woq kernels run for `isa`: the vector kernels also need FMA, which cpu.h does not check.
Isa woq_isa(Isa isa);

}  // namespace fastround::infer
