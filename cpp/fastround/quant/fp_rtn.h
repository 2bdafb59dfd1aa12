// Round-to-nearest into small float formats with per-group scales, as upstream's model-free kernels do:
// MXFP4 / MXFP8 (E8M0 shared exponent per 32 inputs, optional exponent search) and NVFP4_E5M3 (UE5M3 scale
// per 16 inputs, optional scale search). All kernels take the weight [rows=out, cols=in] row-major in its
// source dtype (F32, F16, BF16); outputs are bit for bit upstream's on CPU.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround {

struct MxfpLayout {
  int64_t rows, cols;
  int bits;  // 4: weight_packed [rows, cols/2] u8, element 2k in the low nibble; 8: weight [rows, cols] e4m3
  // weight_scale [rows, cols/32] u8, E8M0
  int64_t weight_bytes() const { return bits == 4 ? rows * cols / 2 : rows * cols; }
  int64_t scale_bytes() const { return rows * cols / 32; }
};

// Throws OptionError naming `site` unless cols is a multiple of 32 and bits is 4 or 8.
MxfpLayout mxfp_layout(int64_t rows, int64_t cols, int bits, const char* site = "mxfp");

// opt_rtn: per group, try shared exponents e, e-1, e+1 and keep the lowest squared error (upstream default).
void quantize_mxfp_ref(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale);
// The same with that squared error weighted by qw [rows, cols] (the regular flow's imatrix, fp_opt_rtn.h).
void quantize_mxfp_weighted_ref(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, const float* qw,
                                uint8_t* weight, uint8_t* scale);
void quantize_mxfp(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale);
void dequantize_mxfp_ref(const uint8_t* weight, const uint8_t* scale, const MxfpLayout& L, float* out);

// NVFP4_E5M3: packed [rows, cols/2] u8 (E2M1, element 2k low nibble), scale [rows, cols/16] u8 UE5M3.
// opt_rtn: search the scale over max * {1, 0.50 .. 1.51}. cols must be a multiple of 16.
void quantize_nvfp4_e5m3_ref(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, uint8_t* packed,
                             uint8_t* scale);
void quantize_nvfp4_e5m3(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, uint8_t* packed,
                         uint8_t* scale);
// Format "fake": the quantize-dequantized weight in the source dtype, written to `out` [rows, cols].
void fake_quantize_nvfp4_e5m3(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, void* out);
void dequantize_nvfp4_e5m3_ref(const uint8_t* packed, const uint8_t* scale, int64_t rows, int64_t cols, float* out);

// Scale-byte codec of NVFP4_E5M3 (unsigned E5M3, bias 15, subnormals below 2^-14).
uint8_t ue5m3_encode(float v);
float ue5m3_decode(uint8_t b);

}  // namespace fastround
