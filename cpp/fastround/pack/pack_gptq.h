// auto_gptq bit packing over plain arrays: lane j of a word holds element j, lane 0 in the low bits.
#pragma once

#include <cstdint>

namespace fastround {

// Unpacked INT codes as any producer (RTN, OPT-RTN, SignRound) leaves them. The packers add the padding
// (in_features up to whole groups, out_features up to whole qzeros words) that an all-zero input would give.
struct IntCodesView {
  int64_t rows = 0, cols = 0;         // weight [out, in]
  int bits = 4;                       // 2, 4 or 8
  int64_t group = 0;                  // group length; per channel: cols rounded up to whole words
  const uint8_t* codes = nullptr;     // [rows, cols], each < 2^bits
  const uint16_t* scales = nullptr;   // [rows, groups] fp16 bits
  const int32_t* zeros = nullptr;     // [rows, groups]
  int32_t pad_zero = 0;               // zero point of an all-zero group: what padded rows hold
  int64_t groups() const { return (cols + group - 1) / group; }
  int64_t cols_p() const { return groups() * group; }
  int64_t rows_p() const { return (rows + 32 / bits - 1) / (32 / bits) * (32 / bits); }
};

// GPTQ layout from codes: qweight [cols_p/pf, rows] int32; qzeros [groups, rows_p/pf] int32 whose lanes hold
// clamp(zp - zero_offset, 0, 2^bits-1); scales [groups, rows] fp16 bits. Padded inputs take their group's
// zero point as code (what round(0/s) + zp gives). Needs cols_p a multiple of 32/bits.
void pack_gptq_ref(const IntCodesView& c, int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales);
void pack_gptq(const IntCodesView& c, int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales);

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
