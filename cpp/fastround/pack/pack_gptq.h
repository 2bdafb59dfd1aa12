// auto_gptq bit packing over plain arrays: lane j of a word holds element j, lane 0 in the low bits.
#pragma once

#include <cstdint>

namespace fastround {

// qweight [cols_p/pf, rows] int32 from codes [rows, cols_p] (unsigned, < 2^bits).
void pack_gptq_qweight_ref(const uint8_t* codes, int64_t rows, int64_t cols_p, int bits, int32_t* qweight);

// qzeros [groups, rows_p/pf] int32 from zeros [rows_p, groups]. Each lane stores clamp(zp - zero_offset, 0,
// 2^bits-1): GPTQ (sym) stores zp-1 for consumers that add 1 back; auto_round asym stores zp as is.
void pack_gptq_qzeros_ref(const int32_t* zeros, int64_t rows_p, int64_t groups, int bits, int zero_offset,
                          int32_t* qzeros);

// Inverse of pack_gptq_qweight_ref.
void unpack_gptq_qweight_ref(const int32_t* qweight, int64_t rows, int64_t cols_p, int bits, uint8_t* codes);

// Inverse of pack_gptq_qzeros_ref; adds zero_offset back.
void unpack_gptq_qzeros_ref(const int32_t* qzeros, int64_t rows_p, int64_t groups, int bits, int zero_offset,
                            int32_t* zeros);

}  // namespace fastround
