// OPT-RTN for INT sym: upstream's quant_tensor_opt_rtn_sym (data_type/int.py search_scales, with gguf.py's
// _imatrix_handle_zero fixing zero imatrix entries), reproduced with the rounding its torch ops have on a tensor
// of the weight's dtype. Per group, with Q = 2^(bits-1) and g the signed element of largest magnitude:
// candidate inverse scales -d/g for d = Q, then Q - step*k (k = -K..K, k != 0; 2-bit: step 0.01, K 90; else step
// 0.0075*Q, K 100), codes L = clamp(round(iscale * w), -Q, Q-1), loss sum(imatrix * (L/iscale - w)^2) in fp32;
// the first strictly smaller loss wins. Every elementwise op rounds to the weight's dtype (torch computes bf16 /
// fp16 ops in fp32 and rounds), the loss is summed in torch CPU's fp32 reduction order. See shared/reference/
// signround.md §3.3.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fastround/common/convert.h"
#include "fastround/common/dtype.h"
#include "fastround/quant/codes.h"

namespace fastround {

// What differs between OPT-RTN and SignRoundV2's init-scale search (upstream's search_optimized_init_scale: the
// same search_scales, fed the imatrix as collected and floored at the layer's q_scale_thresh).
struct OptRtnOptions {
  bool fix_zero_imatrix = true;  // OPT-RTN's _imatrix_handle_zero; SignRoundV2 uses the imatrix as given
  float scale_thresh = 1e-5f;    // |scale| floor, itself rounded to the weight's dtype (1e-8 for fp32 scale_dtype)
};

// Codes [rows, cols] = clamp(round(w / scale), -Q, Q-1) + Q and scales [rows, groups] in `src` (F32 / F16 / BF16
// elements): the searched scale with |scale| >= 1e-5 (in that dtype), not cast to fp16 (upstream keeps it
// unrounded; its packer casts it). imatrix: [cols] fp32 loss weights, null for none (weight 1). Groups as
// IntGrouping; the imatrix pads partial groups with 1e-5 and its zero entries are fixed up per group as upstream
// does (unless opt.fix_zero_imatrix is false). codes may be null: scales only. The reference walks one group at
// a time.
void int_opt_rtn_ref(DType src, const void* w, const IntGrouping& g, int bits, const float* imatrix, uint8_t* codes,
                     void* scales, const OptRtnOptions& opt = {});
// Rows in parallel, the loss elements in vector code, candidates that repeat the previous inverse scale skipped;
// output identical to int_opt_rtn_ref (groups the vector path cannot prove exact take the reference).
void int_opt_rtn(DType src, const void* w, const IntGrouping& g, int bits, const float* imatrix, uint8_t* codes,
                 void* scales, const OptRtnOptions& opt = {});

// One element of upstream's loss tensor for a candidate: L = clamp(round(dt(iscale * x)), -nmax, nmax - 1) (NaN
// passes, as torch.clamp), e = dt(dt(scale * L) - x), then e * e in fp32, times the weight unless w is null.
inline float opt_rtn_loss_element(DType dt, float x, const float* w, float iscale, float scale, float nmax) {
  float L = std::nearbyint(round_to_dtype(dt, iscale * x));
  if (!std::isnan(L)) L = std::min(std::max(L, -nmax), nmax - 1.0f);
  const float e = round_to_dtype(dt, round_to_dtype(dt, scale * L) - x);
  return w != nullptr ? (e * e) * *w : e * e;
}

// torch CPU's float32 sum of n contiguous values (ATen SumKernel's cascade over 8-lane vectors, the scalar tail,
// then the lanes in order), as torch.sum(x, dim=-1) gives for each row of a contiguous tensor.
float torch_sum_f32(const float* x, int64_t n);

}  // namespace fastround
