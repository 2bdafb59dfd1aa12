#include "fastround/common/nonfinite.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"

namespace fastround {

namespace {

void require_float(DType dtype) {
  if (!dtype_is_float_weight(dtype))
    throw OptionError("[count_nonfinite] unsupported dtype " + std::string(dtype_name(dtype)));
}

// An element is NaN or Inf exactly when its exponent field is all ones; comparing masked integers keeps
// the loop free of float compares, so it vectorizes at any -ffast-math setting.
template <typename U, U kExpMask>
int64_t count_exp_all_ones(const U* p, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (p[i] & kExpMask) == kExpMask;
  return count;
}

int64_t count_range(DType dtype, const void* data, int64_t begin, int64_t n) {
  switch (dtype) {
    case DType::F32: return count_exp_all_ones<uint32_t, 0x7F800000u>(static_cast<const uint32_t*>(data) + begin, n);
    case DType::BF16: return count_exp_all_ones<uint16_t, 0x7F80u>(static_cast<const uint16_t*>(data) + begin, n);
    default: return count_exp_all_ones<uint16_t, 0x7C00u>(static_cast<const uint16_t*>(data) + begin, n);
  }
}

}  // namespace

int64_t count_nonfinite_ref(DType dtype, const void* data, int64_t n) {
  require_float(dtype);
  int64_t count = 0;
  float v = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    load_as_float(dtype, data, i, 1, &v);
    count += !std::isfinite(v);
  }
  return count;
}

int64_t count_nonfinite(DType dtype, const void* data, int64_t n) {
  require_float(dtype);
  constexpr int64_t kChunk = 1 << 16;  // elements per task: large enough to stream, small enough to balance
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) return count_range(dtype, data, 0, n);
  std::vector<int64_t> counts(static_cast<size_t>(chunks));
  parallel_for(chunks, [&](int64_t c) {
    const int64_t begin = c * kChunk;
    counts[static_cast<size_t>(c)] = count_range(dtype, data, begin, std::min(kChunk, n - begin));
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

}  // namespace fastround
