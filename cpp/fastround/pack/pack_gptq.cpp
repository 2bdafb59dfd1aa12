#include "fastround/pack/pack_gptq.h"

#include <algorithm>

namespace fastround {

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
