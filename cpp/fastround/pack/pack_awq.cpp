#include "fastround/pack/pack_awq.h"

#include "fastround/common/parallel.h"

namespace fastround {

namespace {

// One int32 of 8 consecutive output channels [o0, o0+8) at input k (or group k): value p in slot kAwqOrder[p].
template <typename Get>
inline int32_t awq_word(Get get) {
  uint32_t word = 0;
  for (int p = 0; p < 8; ++p) word |= (static_cast<uint32_t>(get(p)) & 0xFu) << (4 * kAwqOrder[p]);
  return static_cast<int32_t>(word);
}

}  // namespace

void pack_awq_ref(const IntCodesView& c, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  const int64_t groups = c.groups(), ow = c.rows / 8;
  for (int64_t k = 0; k < c.cols; ++k)
    for (int64_t w = 0; w < ow; ++w)
      qweight[k * ow + w] = awq_word([&](int p) { return c.codes[(w * 8 + p) * c.cols + k]; });
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t w = 0; w < ow; ++w) qzeros[g * ow + w] = awq_word([&](int p) { return c.zeros[(w * 8 + p) * groups + g]; });
    for (int64_t r = 0; r < c.rows; ++r) scales[g * c.rows + r] = c.scales[r * groups + g];
  }
}

void pack_awq(const IntCodesView& c, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  const int64_t groups = c.groups(), ow = c.rows / 8;
  // Each task owns 8 output channels: one column of qweight/qzeros words and 8 columns of scales.
  parallel_for(ow, [&](int64_t w) {
    const uint8_t* rows8[8];
    for (int p = 0; p < 8; ++p) rows8[p] = c.codes + (w * 8 + p) * c.cols;
    for (int64_t k = 0; k < c.cols; ++k) {
      uint32_t word = 0;
      for (int p = 0; p < 8; ++p) word |= (static_cast<uint32_t>(rows8[p][k]) & 0xFu) << (4 * kAwqOrder[p]);
      qweight[k * ow + w] = static_cast<int32_t>(word);
    }
    for (int64_t g = 0; g < groups; ++g) {
      qzeros[g * ow + w] = awq_word([&](int p) { return c.zeros[(w * 8 + p) * groups + g]; });
      for (int p = 0; p < 8; ++p) scales[g * c.rows + w * 8 + p] = c.scales[(w * 8 + p) * groups + g];
    }
  });
}

void unpack_awq_ref(const int32_t* qweight, const int32_t* qzeros, int64_t rows, int64_t cols, int64_t group,
                    uint8_t* codes, int32_t* zeros) {
  const int64_t groups = cols / group, ow = rows / 8;
  for (int64_t w = 0; w < ow; ++w)
    for (int p = 0; p < 8; ++p) {
      const int shift = 4 * kAwqOrder[p];
      for (int64_t k = 0; k < cols; ++k)
        codes[(w * 8 + p) * cols + k] = static_cast<uint8_t>((static_cast<uint32_t>(qweight[k * ow + w]) >> shift) & 0xFu);
      for (int64_t g = 0; g < groups; ++g)
        zeros[(w * 8 + p) * groups + g] = static_cast<int32_t>((static_cast<uint32_t>(qzeros[g * ow + w]) >> shift) & 0xFu);
    }
}

}  // namespace fastround
