// Round-to-nearest INT quantization with auto_gptq packing (upstream's eager RTN, bit for bit).
// All kernels take the weight [rows=out, cols=in] row-major in its source dtype (F32, F16, BF16).
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround {

struct IntQuantParams {
  int bits;            // 2, 4 or 8
  int64_t group_size;  // > 0, or -1 for one group per output row
  bool sym;
  int zero_offset;     // qzeros lanes hold zp - zero_offset
};

// Shapes of the packed outputs; see int_gptq_layout.
struct IntGptqLayout {
  int64_t rows, cols;      // weight [out, in]
  int64_t group;           // effective group length (cols for per-channel)
  int64_t groups;          // groups per row
  int64_t cols_p;          // in padded to whole groups (and whole words)
  int64_t rows_p;          // out padded to whole qzeros words
  int pack_factor;         // 32 / bits
  // qweight [cols_p/pf, rows] int32; qzeros [groups, rows_p/pf] int32; scales [groups, rows] fp16
  int64_t qweight_elems() const { return cols_p / pack_factor * rows; }
  int64_t qzeros_elems() const { return groups * (rows_p / pack_factor); }
  int64_t scales_elems() const { return groups * rows; }
};

// Throws OptionError naming `site` when the shape cannot be packed (padded in not a multiple of 32/bits).
IntGptqLayout int_gptq_layout(int64_t rows, int64_t cols, const IntQuantParams& p, const char* site);

// Per-group scale and zero point from the group's min and max (both already clamped through 0).
struct IntGroupQuant {
  uint16_t scale_fp16;  // stored bits
  float scale;          // the fp16 scale, as the fp32 divisor
  int32_t zero;         // integer zero point added to the rounded quotient
};
IntGroupQuant int_group_quant(float mn, float mx, int bits, bool sym);

// Scalar reference: unpacked codes [rows, cols_p] and zeros [rows_p, groups], then the pack_gptq_*_ref packers.
void quantize_int_rtn_ref(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p, uint8_t* codes,
                          int32_t* zeros, uint16_t* scales);
void quantize_int_gptq_ref(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p,
                           int32_t* qweight, int32_t* qzeros, uint16_t* scales);

// Fused, tiled, OpenMP-parallel quantize + pack; output identical to quantize_int_gptq_ref.
void quantize_int_gptq(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p, int32_t* qweight,
                       int32_t* qzeros, uint16_t* scales);

// Dequantize packed outputs to float [rows, cols] (for tests and inspection).
void dequantize_int_gptq_ref(const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales,
                             const IntGptqLayout& L, const IntQuantParams& p, float* out);

}  // namespace fastround
