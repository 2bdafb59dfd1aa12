// Fused block Hadamard rotation + MXFP4 activation quantize-dequantize: upstream's load-time fast path for rotated
// MXFP checkpoints (transforms-and-formats.md §1.5, "Input mode"; its Triton kernel follows FP-Quant's).
//
// Each row of x [rows, cols] is rotated per n-block (FwhtSpec: v <- S·T·v without its 1/sqrt(n), see fwht.h), the
// block sums are multiplied by c = 1/sqrt(n) rounded to x's dtype (upstream multiplies by its block matrix cast to
// the activation dtype: ±bf16(1/sqrt(32)) for bf16 input), and the rotated row is quantized per 32 consecutive
// elements with FP-Quant's scale, not an E8M0 one:
//     s = 2^(floor(log2 amax) - 2) / 0.75        (so amax / s lies in [3, 6))
//     q = the E2M1 magnitude of |v / s| with strict thresholds .25 .75 1.25 1.75 2.5 3.5 5 (ties go down)
//     out = (v / s > 0 ? q : -q) · s              (zeros and small negatives give -0, as upstream's sign)
// all in fp32, rounded once to x's dtype. The output stays in the rotated space. amax = 0 gives s = 0 and -0
// outputs (upstream's 0/0 compares false everywhere); NaN elements are left out of amax.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/common/half.h"
#include "fastround/transform/fwht.h"

namespace fastround::transform {

constexpr int64_t kMxfp4ActGroup = 32;  // the MX activation group, fixed by the format

// 2^(floor(log2 amax) - 2) / 0.75 from amax's bits (exact for subnormals; no libm, so host and device agree).
// amax = 0 -> 0, inf -> inf, NaN -> NaN, as exp2(floor(log2 amax) - 2) / 0.75 gives them.
FASTROUND_HD inline float mxfp4_act_scale(float amax) {
  const uint32_t u = float_bits(amax) & 0x7FFFFFFFu;
  if (u == 0) return 0.0f;
  if (u >= 0x7F800000u) return bits_float(u);
  int e;  // floor(log2 amax)
  if (u >= 0x00800000u) {
    e = static_cast<int>(u >> 23) - 127;
  } else {
    int top = 22;
    while (!((u >> top) & 1u)) --top;
    e = top - 149;
  }
  const int p = e - 2;  // 2^p as fp32: normal, subnormal, or 0 below 2^-149 (2^-150 ties to even, 0)
  float pow2;
  if (p >= -126) pow2 = bits_float(static_cast<uint32_t>(p + 127) << 23);
  else if (p >= -149) pow2 = bits_float(1u << (p + 149));
  else pow2 = 0.0f;
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(pow2, 0.75f);
#else
  return pow2 / 0.75f;
#endif
}

// One element's quantize-dequantize with the group scale s (see the file comment).
FASTROUND_HD inline float mxfp4_act_qdq(float v, float s) {
#if defined(__CUDA_ARCH__)
  const float r = __fdiv_rn(v, s);  // IEEE whatever -prec-div says
#else
  const float r = v / s;
#endif
  const float a = r < 0.0f ? -r : r;  // NaN stays NaN and passes no threshold: q = 0
  const float q = (a > 5.0f) ? 6.0f : (a > 3.5f) ? 4.0f : (a > 2.5f) ? 3.0f : (a > 1.75f) ? 2.0f
                : (a > 1.25f) ? 1.5f : (a > 0.75f) ? 1.0f : (a > 0.25f) ? 0.5f : 0.0f;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(r > 0.0f ? q : -q, s);
#else
  return (r > 0.0f ? q : -q) * s;
#endif
}

// c = 1/sqrt(n) rounded to `dtype` (F32, F16 or BF16), then widened to fp32.
float hadamard_norm_in(DType dtype, int64_t n);

// dtype F32, F16 or BF16; cols a multiple of 32 and of rot.n; rot as fwht_check accepts it (rot.normalize picks
// whether c is applied). Throws OptionError naming `site` and the option at fault.
void hadamard_mxfp4_act_check(DType dtype, const void* x, const void* out, int64_t rows, int64_t cols,
                              const FwhtSpec& rot, const char* site);

// x, out [rows, cols] of `dtype`, row-major; out may be x.
void hadamard_mxfp4_act_rows_ref(DType dtype, const void* x, void* out, int64_t rows, int64_t cols,
                                 const FwhtSpec& rot);
// The same result bit for bit: row chunks over OpenMP threads (static), the group loops written for the vectorizer.
void hadamard_mxfp4_act_rows(DType dtype, const void* x, void* out, int64_t rows, int64_t cols, const FwhtSpec& rot);

}  // namespace fastround::transform
