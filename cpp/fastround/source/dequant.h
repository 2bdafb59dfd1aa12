// Source formats that are already quantized, decoded to bf16 so the normal kernels can requantize them.
// Plain C++ over raw pointers, with the arithmetic of upstream's torch code (bf16 operands, bf16 product).
#pragma once

#include <cstdint>
#include <string>

#include "fastround/common/dtype.h"

namespace fastround {

// scale_inv of an FP8 weight: a block grid [rows, cols] with block_rows x block_cols elements per entry,
// or (block 0) a scalar / per-row / per-column scale. e8m0 marks scale_fmt "ue8m0" byte scales.
struct Fp8ScaleView {
  DType dtype = DType::F32;
  const void* data = nullptr;
  int64_t numel = 0;
  int64_t rows = 0, cols = 0;  // 0 when the scale is not 2-D
  int64_t block_rows = 0, block_cols = 0;
  bool e8m0 = false;
};

// out [rows, cols] bf16 = bf16(bf16(w) * bf16(scale_inv)); throws CheckpointError naming `tensor` when the
// scale does not cover the weight.
void dequant_fp8_scaled_ref(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s,
                            const std::string& tensor, uint16_t* out);
void dequant_fp8_scaled(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s,
                        const std::string& tensor, uint16_t* out);

// MX sources in the compressed-tensors layout: bits 8 -> weight float8_e4m3 [rows, cols]; bits 4 ->
// weight_packed [rows, cols/2] (element 2k in the low nibble); scale E8M0 [rows, cols/32]. out bf16 [rows, cols].
void dequant_mxfp_source(int bits, const uint8_t* w, const uint8_t* scale, int64_t rows, int64_t cols, uint16_t* out);

}  // namespace fastround
