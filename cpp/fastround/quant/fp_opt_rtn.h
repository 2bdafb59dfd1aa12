// OPT-RTN of MXFP4 / MXFP8 in the regular flow: upstream 0.16.1's quant_mx_opt_rtn (data_type/mxfp.py) with the
// imatrix collected from calibration data. The search is model-free's (shared exponent of max * {1, 0.5, 2}, the
// first strictly lower loss wins, fp_numerics.h), its loss weighted per element: sum((qdq - w)^2 * qw) in fp32,
// torch CPU's summation order. qw is the imatrix broadcast over rows, fixed up where it holds zeros as gguf.py's
// _imatrix_handle_zero does on the fp32 weight cut into 32-groups:
//   - only when some imatrix entry is exactly 0 (its min is 0; a negative or no zero entry leaves it as is);
//   - a group with more than 16 entries <= 1e-30 takes |w| + sqrt(sum(w^2) / 32) of its weight row;
//   - when any group has 1..16 such entries, every exact zero left (in any group) takes its row's
//     sum / (32 - count), the count from the imatrix before the step above (0 / 0 gives NaN, as in torch).
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"
#include "fastround/quant/fp_rtn.h"

namespace fastround {

// Codes [rows, cols], one byte per element (E2M1 nibble for bits 4, E4M3 byte for bits 8), and E8M0 scale
// [rows, cols/32], as the regular flow packs them. imatrix: [cols] fp32 (finite), or null for unweighted.
// The reference builds the whole weight tensor in upstream's order, one pass after another.
void mx_opt_rtn_ref(DType src, const void* w, const MxfpLayout& L, const float* imatrix, uint8_t* codes,
                    uint8_t* scale);
// Rows in parallel, each group's weights built on the fly; identical to mx_opt_rtn_ref.
void mx_opt_rtn(DType src, const void* w, const MxfpLayout& L, const float* imatrix, uint8_t* codes, uint8_t* scale);

}  // namespace fastround
