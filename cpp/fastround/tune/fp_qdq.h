// SignRound's MXFP (and NVFP4_E5M3) quantize-dequantize with trainable rounding offsets V and a per-group range factor, forward and
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

// NVFP4_E5M3 (upstream's nvfp4_v2, global scale 1): per 16 inputs, the scale max|x| * max_scale / 6 clipped to
// [0, 114688] and cast to UE5M3 with a straight-through gradient, x / scale + v clamped to [-6, 6], cast_to_fp4's
// band-wise rounding, times the scale; the same backward rules as MX (the maximum's gradient rounded to x's dtype
// first: upstream takes the maximum before its fp32 cast there).
constexpr int64_t kNvGroup = 16;

// NVFP4 (upstream's nv_fp4 / nv_fp4_with_static_gs through ref_nvfp4_quant): per 16 inputs the scale
// gs * (max|x| * max_scale / 6) clamped to +-448 and cast to E4M3 with a straight-through gradient; the element
// scale os = 1 / (scale * (1 / gs)) (0 for 0), x * os + v clamped to [-6, 6], cast_to_fp4's bands, times 1 / os.
// gs is the per-tensor global scale (weights: 448 * 6 / max|W|, activations: the same of the calibrated max),
// a constant of the op. Its backward is autograd's through those reciprocals: where a scale is 0 the masked
// branch's gradient meets 1 / 0 and gives NaN (-0 * inf), as upstream's get_reciprocal does.
struct FpQdqParams {
  int bits = 4;         // MX: 4 (E2M1 elements, MXFP4) or 8 (E4M3, MXFP8), an E8M0 exponent per 32 inputs
  bool nv_e5m3 = false; // NVFP4_E5M3: bits 4, E2M1 elements, a UE5M3 scale per 16 inputs
  bool nv_fp4 = false;  // NVFP4: bits 4, E2M1 elements, an E4M3 scale per 16 inputs under global_scale
  float global_scale = 0.0f;
  int64_t group() const { return (nv_e5m3 || nv_fp4) ? kNvGroup : kMxGroup; }
};

struct FpQdqView {
  DType dtype = DType::BF16;         // x and qdq dtype: F32, F16, BF16
  const void* x = nullptr;           // [rows, cols] weight or activations; cols a multiple of the group (g)
  int64_t rows = 0, cols = 0;
  const float* v = nullptr;          // [rows*cols/g, g] rounding offsets; nullptr: 0
  const float* max_scale = nullptr;  // [rows*cols/g] range factors; nullptr: 1
};

// Checks dtype, bits, pointers and the column grouping; throws OptionError naming `site`.
void fp_qdq_check(const FpQdqView& view, const FpQdqParams& params, const char* site);

// Forward: qdq [rows, cols] in view.dtype; exponent [rows*cols/g] (MX: the clamped shared exponent; NV: the
// decoded UE5M3 scale; NVFP4: the decoded E4M3 scale, before the global scale, as fp32); when not null, codes
// [rows, cols] (E2M1 nibble or E4M3 byte of qdq / scale, as the packers take them) and scales [rows*cols/g] (E8M0
// bytes e + 127; NV: UE5M3 bytes; NVFP4: E4M3 bytes).
void fp_qdq_forward_ref(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                        uint8_t* codes = nullptr, uint8_t* scales = nullptr);
void fp_qdq_forward(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                    uint8_t* codes = nullptr, uint8_t* scales = nullptr);

// Backward of the forward's qdq: grad [rows, cols] in view.dtype in; out (each may be null, all overwritten):
// grad_v [rows*cols/g, g] fp32, grad_max [rows*cols/g] fp32, grad_x [rows, cols] in view.dtype (the gradient
// reaching x, the maximum's path included, as an activation's).
void fp_qdq_backward_ref(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                         float* grad_max, void* grad_x);
void fp_qdq_backward(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                     float* grad_max, void* grad_x);

}  // namespace fastround::tune
