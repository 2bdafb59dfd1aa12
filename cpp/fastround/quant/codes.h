// Unpacked codes as upstream's regular flow (a model in memory) produces and consumes them: INT RTN computed
// with the rounding of torch ops on a tensor of the weight's own dtype, and the quantize-dequantized weight that
// codes stand for (what the regular flow leaves in the model). Upstream's model-free path casts every weight to
// fp32 first, so on an F32 weight int_rtn_codes gives int_rtn.h's codes; on BF16 / F16 weights a few
// intermediate results round to the weight's dtype and the codes can differ.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround {

// How upstream's reshape_pad_tensor_by_group_size splits a [rows, cols] weight: `groups` runs of `group`
// inputs per row, the last zero-padded; group_size -1, or larger than cols, gives one unpadded group per row.
struct IntGrouping {
  int64_t rows = 0, cols = 0;
  int64_t group_size = 0;  // as given (-1 included): upstream's imatrix zero rule reads it
  int64_t group = 0;       // inputs per group, padding included
  int64_t groups = 0;      // groups per row
  int64_t cols_p() const { return group * groups; }
};

// Throws OptionError naming `site` for an empty weight or a group_size that is neither -1 nor positive.
IntGrouping int_grouping(int64_t rows, int64_t cols, int64_t group_size, const char* site);

// RTN codes [rows, cols] (q + zero point, in [0, 2^bits)), fp16 scale bits [rows, groups] and zero points
// [rows, groups], as upstream's quant_tensor_sym / quant_tensor_rtn_sym / quant_tensor_asym compute them on a
// `src` tensor: the asym range and scale round to `src` before the fp16 cast, and an F16 weight divides by its
// fp16 scale in fp16 (a BF16 or F32 weight divides in fp32). The reference walks the groups one by one.
void int_rtn_codes_ref(DType src, const void* w, const IntGrouping& g, int bits, bool sym, uint8_t* codes,
                       uint16_t* scales, int32_t* zeros);
// Rows in parallel; output identical to int_rtn_codes_ref.
void int_rtn_codes(DType src, const void* w, const IntGrouping& g, int bits, bool sym, uint8_t* codes,
                   uint16_t* scales, int32_t* zeros);

// dst [rows, cols] in `out` (F32, F16, BF16) = out(scale * (code - zero)), the product in fp32: exact for fp16 and
// bf16 scales, fp32-rounded for F32 ones, as torch multiplies. scales [rows, groups] in `scale_dtype`
// (F16, BF16 or F32); zeros [rows, groups]. A zero q gives 0 * scale (what dequantizing the packed tensors gives),
// except with `source` (the weight [rows, cols] the codes came from, in `source_dtype`) and sym: there upstream's
// round(w / s) * s carries the weight's sign (-0 for a negative w that rounds to 0). Rows in parallel.
void dequantize_int_codes(const uint8_t* codes, DType scale_dtype, const void* scales, const int32_t* zeros,
                          const IntGrouping& g, DType out, void* dst, bool sym = false,
                          DType source_dtype = DType::F32, const void* source = nullptr);

// MXFP codes [rows, cols] (E2M1 nibbles for bits 4, E4M3 bytes for bits 8) with E8M0 scales [rows, cols/32];
// NVFP4_E5M3 E2M1 codes with UE5M3 scales [rows, cols/16]. dst = out(value * scale), the product in fp32 as
// upstream's qdq leaves it. Rows in parallel.
void dequantize_mxfp_codes(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, int bits, DType out,
                           void* dst);
void dequantize_nvfp4_codes(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, DType out,
                            void* dst);

}  // namespace fastround
