#include "fastround/pack/pack_fp.h"

#include <algorithm>

#include "fastround/common/parallel.h"

namespace fastround {

void pack_e2m1_ref(const uint8_t* codes, int64_t n, uint8_t* out) {
  for (int64_t k = 0; k < n / 2; ++k) out[k] = static_cast<uint8_t>((codes[2 * k] & 0xF) | ((codes[2 * k + 1] & 0xF) << 4));
}

void pack_e2m1(const uint8_t* codes, int64_t n, uint8_t* out) {
  constexpr int64_t kChunk = 1 << 16;  // bytes of output per task: large enough to amortise the fork
  const int64_t half = n / 2;
  parallel_for((half + kChunk - 1) / kChunk, [&](int64_t t) {
    const int64_t k1 = std::min(half, (t + 1) * kChunk);
    for (int64_t k = t * kChunk; k < k1; ++k)
      out[k] = static_cast<uint8_t>((codes[2 * k] & 0xF) | ((codes[2 * k + 1] & 0xF) << 4));
  });
}

void unpack_e2m1_ref(const uint8_t* packed, int64_t n, uint8_t* codes) {
  for (int64_t k = 0; k < n / 2; ++k) {
    codes[2 * k] = packed[k] & 0xF;
    codes[2 * k + 1] = packed[k] >> 4;
  }
}

}  // namespace fastround
