// SignRound's MXFP quantize-dequantize with trainable rounding offsets V and a per-group range factor, forward and
// straight-through backward, with the operations of upstream's quant_mx (signround.md §4.2) in its order: the
// group maximum of |x| (fp32) times max_scale, shared exponent floor(log2) - emax clamped to [-127, 127], x / 2^e
// + v clamped to the element range, the element rounding of quant_element, times 2^e, back in x's dtype. The same
// kernels quantize activations (no V, no factor) and then also return the gradient reaching the input.
//
// The backward is the gradient torch's autograd computes through those ops, op for op in fp32: floor is a
// straight-through identity (so the private and shared exponents pass gradient through log2 and pow), clamps pass
// it where the value lies inside (bounds included), sign() passes none, a group's two scale-gradient sums are
// torch's 8-lane sums over the 32 elements, and the maximum's gradient reaches the first maximal element.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround::tune {

constexpr int64_t kMxGroup = 32;

struct FpQdqParams {
  int bits = 4;  // 4: E2M1 elements (MXFP4), 8: E4M3 elements (MXFP8); E8M0 shared exponent per 32 inputs
};

struct FpQdqView {
  DType dtype = DType::BF16;         // x and qdq dtype: F32, F16, BF16
  const void* x = nullptr;           // [rows, cols] weight or activations; cols a multiple of 32
  int64_t rows = 0, cols = 0;
  const float* v = nullptr;          // [rows*cols/32, 32] rounding offsets; nullptr: 0
  const float* max_scale = nullptr;  // [rows*cols/32] range factors; nullptr: 1
};

// Checks dtype, bits, pointers and the 32-column grouping; throws OptionError naming `site`.
void fp_qdq_check(const FpQdqView& view, const FpQdqParams& params, const char* site);

// Forward: qdq [rows, cols] in view.dtype; exponent [rows*cols/32] (the clamped shared exponent, as fp32); when
// not null, codes [rows, cols] (E2M1 nibble or E4M3 byte of qdq / 2^e, as the packers take them) and scales
// [rows*cols/32] (E8M0 bytes, e + 127).
void fp_qdq_forward_ref(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                        uint8_t* codes = nullptr, uint8_t* scales = nullptr);
void fp_qdq_forward(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                    uint8_t* codes = nullptr, uint8_t* scales = nullptr);

// Backward of the forward's qdq: grad [rows, cols] in view.dtype in; out (each may be null, all overwritten):
// grad_v [rows*cols/32, 32] fp32, grad_max [rows*cols/32] fp32, grad_x [rows, cols] in view.dtype (the gradient
// reaching x, the maximum's path included, as an activation's).
void fp_qdq_backward_ref(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                         float* grad_max, void* grad_x);
void fp_qdq_backward(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                     float* grad_max, void* grad_x);

}  // namespace fastround::tune
