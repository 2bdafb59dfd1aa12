// AWQ GEMM packing (auto_awq, auto_round:auto_awq), 4-bit only: packed along out_features, interleaved.
#pragma once

#include <cstdint>

#include "fastround/pack/pack_gptq.h"

namespace fastround {

// Nibble slot of column p within each run of 8 output channels.
inline constexpr int kAwqOrder[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// qweight [cols, rows/8] int32; qzeros [groups, rows/8] int32 (zero points as is, same interleave);
// scales [groups, rows] fp16 bits. Needs bits 4, cols a multiple of the group and rows a multiple of 8.
void pack_awq_ref(const IntCodesView& c, int32_t* qweight, int32_t* qzeros, uint16_t* scales);
void pack_awq(const IntCodesView& c, int32_t* qweight, int32_t* qzeros, uint16_t* scales);

// Inverse of pack_awq_ref: codes [rows, cols] and zeros [rows, groups].
void unpack_awq_ref(const int32_t* qweight, const int32_t* qzeros, int64_t rows, int64_t cols, int64_t group,
                    uint8_t* codes, int32_t* zeros);

}  // namespace fastround
