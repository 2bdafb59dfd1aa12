// Source formats that are already quantized, decoded to bf16 so the normal kernels can requantize them.
// Plain C++ over raw pointers, with the arithmetic of upstream's torch code (bf16 operands, bf16 product).
#pragma once

#include <cstdint>
#include <string>

#include "fastround/common/dtype.h"

namespace fastround {

// scale_inv of an FP8 weight: a block grid [rows, cols] with block_rows x block_cols elements per entry,
// or (block 0) a scalar / per-row / per-column scale; a negative block is the config's invalid one.
// e8m0 marks scale_fmt "ue8m0" byte scales.
struct Fp8ScaleView {
  DType dtype = DType::F32;
  const void* data = nullptr;
  int64_t numel = 0;
  int64_t rows = 0, cols = 0;  // 0 when the scale is not 2-D
  int64_t block_rows = 0, block_cols = 0;
  bool e8m0 = false;
};

// Throws CheckpointError starting with `site` unless the scale has a float (or ue8m0 byte) dtype and covers
// a [rows, cols] weight: what dequant_fp8_scaled checks before its parallel loop, for the planner to ask first.
void check_fp8_scale(int64_t rows, int64_t cols, const Fp8ScaleView& s, const std::string& site);

// out [rows, cols] bf16 = bf16(bf16(w) * bf16(scale_inv)); throws CheckpointError naming `tensor` when the
// scale does not cover the weight.
void dequant_fp8_scaled_ref(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s,
                            const std::string& tensor, uint16_t* out);
void dequant_fp8_scaled(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s,
                        const std::string& tensor, uint16_t* out);

// MX sources in the compressed-tensors layout: bits 8 -> weight float8_e4m3 [rows, cols]; bits 4 ->
// weight_packed [rows, cols/2] (element 2k in the low nibble); scale E8M0 [rows, cols/32]. out bf16 [rows, cols].
void dequant_mxfp_source(int bits, const uint8_t* w, const uint8_t* scale, int64_t rows, int64_t cols, uint16_t* out);

// NVFP4 sources: weight_packed [rows, cols/2] E2M1 (element 2k in the low nibble), block scale
// [rows, cols/group] already in fp32 (group 16 for NVFP4), and `global_mult` when has_global (the reciprocal
// of compressed-tensors' weight_global_scale, 0 for a zero scale; ModelOpt's scale2 as is).
// out bf16 [rows, cols] = bf16(fp32(fp32(v * scale) * global_mult)): upstream's order of products.
void dequant_nvfp4_source(const uint8_t* packed, const float* scale, int64_t rows, int64_t cols, int64_t group,
                          bool has_global, float global_mult, uint16_t* out);

// INT4 sources (kimi_k25 "RAWINT4" / compressed-tensors pack-quantized): nibbles of uint8 bytes (low first) or
// int32 words (least significant first), `q - zero` (or `q - 8` without a zero point) times the group's
// fp32 scale, rounded to bf16.
struct Int4SourceView {
  const void* packed = nullptr;
  bool words32 = false;        // int32 words of 8 nibbles, else bytes of 2
  int64_t rows = 0, cols = 0;  // of the unpacked weight
  int64_t group = 0;
  const float* scale = nullptr;  // [rows, cols/group]
  const int16_t* zero = nullptr;  // null, [rows, cols/group], or [rows, cols] when zero_per_element
  bool zero_per_element = false;
};
void dequant_int4_source(const Int4SourceView& v, uint16_t* out);

// Nibble k of an INT4 row (what dequant_int4_source reads); also unpacks zero points stored like the weight.
inline int int4_nibble(const void* row, bool words32, int64_t k) {
  if (words32) return static_cast<int>((static_cast<const uint32_t*>(row)[k / 8] >> (4 * (k % 8))) & 0xF);
  const uint8_t b = static_cast<const uint8_t*>(row)[k / 2];
  return (k & 1) ? (b >> 4) : (b & 0xF);
}

// DeepSeek V4 / V3.2 E8M0 block scales as compressed-tensors MX scales [rows, cols/32]: repeated when the
// target is a whole multiple of the scale, else a [ceil(rows/128), ceil(cols/128)] grid repeated 128x along
// rows and 4x along columns, then cropped. Throws CheckpointError starting with `site` for any other shape.
void expand_e8m0_block_scale(const uint8_t* scale, int64_t srows, int64_t scols, int64_t rows, int64_t cols,
                             const std::string& site, uint8_t* out);

}  // namespace fastround
