#include "fastround/pack/pack_gptq.h"

#include <algorithm>
#include <vector>

#include "fastround/common/parallel.h"

namespace fastround {

namespace {

// Code of input column k of row r, padding included: a padded input is 0, whose code is the group's zero point.
inline uint32_t padded_code(const IntCodesView& c, int64_t r, int64_t k, int32_t maxq) {
  if (k < c.cols) return c.codes[r * c.cols + k];
  return static_cast<uint32_t>(std::clamp(c.zeros[r * c.groups() + k / c.group], 0, maxq));
}

inline int32_t padded_zero(const IntCodesView& c, int64_t r, int64_t g) {
  return r < c.rows ? c.zeros[r * c.groups() + g] : c.pad_zero;
}

template <int BITS>
void pack_gptq_tiles(const IntCodesView& c, int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  constexpr int PF = 32 / BITS;
  constexpr int32_t kMaxq = (1 << BITS) - 1;
  constexpr int64_t kTile = 32;  // a multiple of every pack factor: a tile owns whole qzeros words
  const int64_t groups = c.groups(), words = c.cols_p() / PF, full_words = c.cols / PF;
  const int64_t rows_p = c.rows_p(), zwords = rows_p / PF;
  parallel_for((rows_p + kTile - 1) / kTile, [&](int64_t tile) {
    const int64_t r0 = tile * kTile, r1 = std::min(r0 + kTile, rows_p), rv = std::min(r1, c.rows);
    for (int64_t r = r0; r < rv; ++r) {
      const uint8_t* row = c.codes + r * c.cols;
      for (int64_t k = 0; k < full_words; ++k) {
        uint32_t word = 0;
        for (int j = 0; j < PF; ++j) word |= static_cast<uint32_t>(row[k * PF + j]) << (BITS * j);
        qweight[k * c.rows + r] = static_cast<int32_t>(word);
      }
      for (int64_t k = full_words; k < words; ++k) {
        uint32_t word = 0;
        for (int j = 0; j < PF; ++j) word |= padded_code(c, r, k * PF + j, kMaxq) << (BITS * j);
        qweight[k * c.rows + r] = static_cast<int32_t>(word);
      }
      for (int64_t g = 0; g < groups; ++g) scales[g * c.rows + r] = c.scales[r * groups + g];
    }
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t w = r0 / PF; w < r1 / PF; ++w) {
        uint32_t word = 0;
        for (int j = 0; j < PF; ++j) {
          const int32_t lane = std::clamp(padded_zero(c, w * PF + j, g) - zero_offset, 0, kMaxq);
          word |= static_cast<uint32_t>(lane) << (BITS * j);
        }
        qzeros[g * zwords + w] = static_cast<int32_t>(word);
      }
  });
}

}  // namespace

void pack_gptq_ref(const IntCodesView& c, int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  const int32_t maxq = (1 << c.bits) - 1;
  const int64_t groups = c.groups(), cols_p = c.cols_p(), rows_p = c.rows_p();
  std::vector<uint8_t> codes(static_cast<size_t>(c.rows * cols_p));  // [rows, cols_p]
  std::vector<int32_t> zeros(static_cast<size_t>(rows_p * groups));  // [rows_p, groups]
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t k = 0; k < cols_p; ++k) codes[r * cols_p + k] = static_cast<uint8_t>(padded_code(c, r, k, maxq));
  for (int64_t r = 0; r < rows_p; ++r)
    for (int64_t g = 0; g < groups; ++g) zeros[r * groups + g] = padded_zero(c, r, g);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t r = 0; r < c.rows; ++r) scales[g * c.rows + r] = c.scales[r * groups + g];
  pack_gptq_qweight_ref(codes.data(), c.rows, cols_p, c.bits, qweight);
  pack_gptq_qzeros_ref(zeros.data(), rows_p, groups, c.bits, zero_offset, qzeros);
}

void pack_gptq(const IntCodesView& c, int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  // The choke point where runtime bits become a template argument.
  switch (c.bits) {
    case 2: return pack_gptq_tiles<2>(c, zero_offset, qweight, qzeros, scales);
    case 4: return pack_gptq_tiles<4>(c, zero_offset, qweight, qzeros, scales);
    case 8: return pack_gptq_tiles<8>(c, zero_offset, qweight, qzeros, scales);
    default: return pack_gptq_ref(c, zero_offset, qweight, qzeros, scales);
  }
}

void pack_gptq_qweight_ref(const uint8_t* codes, int64_t rows, int64_t cols_p, int bits, int32_t* qweight) {
  const int pf = 32 / bits;
  for (int64_t k = 0; k < cols_p / pf; ++k)
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t word = 0;
      for (int j = 0; j < pf; ++j) word |= static_cast<uint32_t>(codes[r * cols_p + k * pf + j]) << (bits * j);
      qweight[k * rows + r] = static_cast<int32_t>(word);
    }
}

void pack_gptq_qzeros_ref(const int32_t* zeros, int64_t rows_p, int64_t groups, int bits, int zero_offset,
                          int32_t* qzeros) {
  const int pf = 32 / bits;
  const int32_t maxq = (1 << bits) - 1;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < rows_p / pf; ++k) {
      uint32_t word = 0;
      for (int j = 0; j < pf; ++j) {
        const int32_t lane = std::clamp(zeros[(k * pf + j) * groups + g] - zero_offset, 0, maxq);
        word |= static_cast<uint32_t>(lane) << (bits * j);
      }
      qzeros[g * (rows_p / pf) + k] = static_cast<int32_t>(word);
    }
}

void unpack_gptq_qweight_ref(const int32_t* qweight, int64_t rows, int64_t cols_p, int bits, uint8_t* codes) {
  const int pf = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t k = 0; k < cols_p / pf; ++k)
    for (int64_t r = 0; r < rows; ++r) {
      const uint32_t word = static_cast<uint32_t>(qweight[k * rows + r]);
      for (int j = 0; j < pf; ++j) codes[r * cols_p + k * pf + j] = static_cast<uint8_t>((word >> (bits * j)) & mask);
    }
}

void unpack_gptq_qzeros_ref(const int32_t* qzeros, int64_t rows_p, int64_t groups, int bits, int zero_offset,
                            int32_t* zeros) {
  const int pf = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t k = 0; k < rows_p / pf; ++k) {
      const uint32_t word = static_cast<uint32_t>(qzeros[g * (rows_p / pf) + k]);
      for (int j = 0; j < pf; ++j)
        zeros[(k * pf + j) * groups + g] = static_cast<int32_t>((word >> (bits * j)) & mask) + zero_offset;
    }
}

}  // namespace fastround
