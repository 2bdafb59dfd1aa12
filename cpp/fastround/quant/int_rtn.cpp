#include "fastround/quant/int_rtn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/half.h"
#include "fastround/common/parallel.h"
#include "fastround/pack/pack_gptq.h"
#include "fastround/quant/simd.h"

namespace fastround {

namespace {

constexpr uint16_t kMinScaleFp16 = 0x00A8;  // fp16(1e-5), upstream's scale clamp

float load_element(DType src, const void* w, int64_t i) {
  switch (src) {
    case DType::F32: return static_cast<const float*>(w)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
    case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(w)[i]);
    default: throw OptionError("[quantize_int] unsupported source dtype " + std::string(dtype_name(src)));
  }
}

// Fast path for one row group: codes = clamp(rne(x / s) + zero, 0, maxq).
// rne via the 1.5*2^23 trick (exact for |v| <= 2^22, vectorizes without SSE4.1); the pre-clamp keeps
// larger quotients in range without changing the clamped result.
template <int BITS>
void encode_group(const float* __restrict x, int64_t n, float scale, float zero, uint8_t* __restrict codes) {
  constexpr float kMaxq = static_cast<float>((1 << BITS) - 1);
  constexpr float kMagic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    v = v < -4194304.0f ? -4194304.0f : (v > 4194304.0f ? 4194304.0f : v);
    v = (v + kMagic) - kMagic;
    v += zero;
    v = v < 0.0f ? 0.0f : (v > kMaxq ? kMaxq : v);
    codes[i] = static_cast<uint8_t>(v);
  }
}

// Writes the qzeros words of one tile from its zero points [tile rows, groups].
template <int BITS>
void pack_tile_qzeros(const IntGptqLayout& L, int64_t r0, int64_t r1, const int32_t* zeros, int zero_offset,
                      int32_t* qzeros) {
  constexpr int PF = 32 / BITS;
  const int64_t zwords = L.rows_p / PF;
  for (int64_t g = 0; g < L.groups; ++g)
    for (int64_t wd = 0; wd < (r1 - r0) / PF; ++wd) {
      uint32_t word = 0;
      for (int j = 0; j < PF; ++j) {
        const int32_t lane = std::clamp(zeros[(wd * PF + j) * L.groups + g] - zero_offset, 0, (1 << BITS) - 1);
        word |= static_cast<uint32_t>(lane) << (BITS * j);
      }
      qzeros[g * zwords + r0 / PF + wd] = static_cast<int32_t>(word);
    }
}

// Vector path: each row's groups encode straight into packed words, laid out as qweight's columns so that
// each word row of the tile is one copy. Needs groups of whole vectors and whole words.
template <int BITS>
void quantize_int_gptq_tiles_simd(const simd::Kernels& K, DType src, const void* w, const IntGptqLayout& L, bool sym,
                                  int zero_offset, int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  constexpr int PF = 32 / BITS;
  constexpr int64_t kTile = 32;
  const int64_t ntiles = (L.rows_p + kTile - 1) / kTile;
  const int32_t pad_zero = int_group_quant(0.0f, 0.0f, BITS, sym).zero;
  const int64_t kwords = L.cols_p / PF;
  parallel_for(ntiles, [&](int64_t tile) {
    const int64_t r0 = tile * kTile;
    const int64_t r1 = std::min(r0 + kTile, L.rows_p);
    const int64_t rv = std::max(r0, std::min(r1, L.rows));
    std::vector<float> row(static_cast<size_t>(L.cols_p), 0.0f);
    std::vector<uint32_t> words(static_cast<size_t>(kwords * kTile));  // [cols_p/PF, tile rows], as qweight
    std::vector<int32_t> zeros(static_cast<size_t>((r1 - r0) * L.groups), pad_zero);  // [tile rows, groups]
    for (int64_t r = r0; r < rv; ++r) {
      K.load_as_float(src, w, r * L.cols, L.cols, row.data());
      for (int64_t g = 0; g < L.groups; ++g) {
        K.int_group(row.data() + g * L.group, L.group, BITS, sym, scales + g * L.rows + r,
                    zeros.data() + (r - r0) * L.groups + g, words.data() + (g * L.group / PF) * kTile + (r - r0), kTile);
      }
    }
    for (int64_t k = 0; k < kwords; ++k)
      std::memcpy(qweight + k * L.rows + r0, words.data() + k * kTile, static_cast<size_t>(rv - r0) * 4);
    pack_tile_qzeros<BITS>(L, r0, r1, zeros.data(), zero_offset, qzeros);
  });
}

template <int BITS>
void quantize_int_gptq_tiles(DType src, const void* w, const IntGptqLayout& L, bool sym, int zero_offset,
                             int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  const simd::Kernels* K = simd::active_kernels();
  if (K != nullptr && L.group % std::max(8, 32 / BITS) == 0)
    return quantize_int_gptq_tiles_simd<BITS>(*K, src, w, L, sym, zero_offset, qweight, qzeros, scales);
  constexpr int PF = 32 / BITS;
  constexpr int64_t kTile = 32;  // a multiple of every pack factor, so tiles own whole qzeros words
  const int64_t ntiles = (L.rows_p + kTile - 1) / kTile;
  const int32_t pad_zero = int_group_quant(0.0f, 0.0f, BITS, sym).zero;
  parallel_for(ntiles, [&](int64_t tile) {
    const int64_t r0 = tile * kTile;
    const int64_t r1 = std::min(r0 + kTile, L.rows_p);
    const int64_t rv = std::max(r0, std::min(r1, L.rows));  // rows [r0, rv) are real, [rv, r1) padding
    std::vector<float> row(static_cast<size_t>(L.cols_p), 0.0f);
    std::vector<uint8_t> codes(static_cast<size_t>((rv - r0) * L.cols_p));  // [tile rows, cols_p]
    std::vector<int32_t> zeros(static_cast<size_t>((r1 - r0) * L.groups), pad_zero);  // [tile rows, groups]
    for (int64_t r = r0; r < rv; ++r) {
      load_as_float(src, w, r * L.cols, L.cols, row.data());
      for (int64_t g = 0; g < L.groups; ++g) {
        const float* x = row.data() + g * L.group;
        float mn = 0.0f, mx = 0.0f;
        for (int64_t i = 0; i < L.group; ++i) {
          mn = x[i] < mn ? x[i] : mn;
          mx = x[i] > mx ? x[i] : mx;
        }
        const IntGroupQuant q = int_group_quant(mn, mx, BITS, sym);
        scales[g * L.rows + r] = q.scale_fp16;
        zeros[(r - r0) * L.groups + g] = q.zero;
        encode_group<BITS>(x, L.group, q.scale, static_cast<float>(q.zero),
                           codes.data() + (r - r0) * L.cols_p + g * L.group);
      }
    }
    for (int64_t k = 0; k < L.cols_p / PF; ++k) {
      int32_t* dst = qweight + k * L.rows;
      for (int64_t t = 0; t < rv - r0; ++t) {
        const uint8_t* c = codes.data() + t * L.cols_p + k * PF;
        uint32_t word = 0;
        for (int j = 0; j < PF; ++j) word |= static_cast<uint32_t>(c[j]) << (BITS * j);
        dst[r0 + t] = static_cast<int32_t>(word);
      }
    }
    pack_tile_qzeros<BITS>(L, r0, r1, zeros.data(), zero_offset, qzeros);
  });
}

}  // namespace

IntGptqLayout int_gptq_layout(int64_t rows, int64_t cols, const IntQuantParams& p, const char* site) {
  if (p.bits != 2 && p.bits != 4 && p.bits != 8)
    throw OptionError(std::string("[int_gptq] ") + site + ": bits must be 2, 4 or 8, got " + std::to_string(p.bits));
  if (rows <= 0 || cols <= 0)
    throw OptionError(std::string("[int_gptq] ") + site + ": cannot quantize an empty weight");
  IntGptqLayout L{};
  L.rows = rows;
  L.cols = cols;
  L.pack_factor = 32 / p.bits;
  if (p.group_size == -1) {
    L.cols_p = (cols + L.pack_factor - 1) / L.pack_factor * L.pack_factor;
    L.group = L.cols_p;
    L.groups = 1;
  } else if (p.group_size > 0) {
    L.group = p.group_size;
    L.groups = (cols + L.group - 1) / L.group;
    L.cols_p = L.groups * L.group;
    if (L.cols_p % L.pack_factor != 0)
      throw OptionError(std::string("[int_gptq] ") + site + ": in_features " + std::to_string(cols) +
                        " padded to group_size " + std::to_string(p.group_size) + " gives " + std::to_string(L.cols_p) +
                        ", not a multiple of " + std::to_string(L.pack_factor) + " values per int32");
  } else {
    throw OptionError(std::string("[int_gptq] ") + site + ": group_size must be -1 or positive, got " +
                      std::to_string(p.group_size));
  }
  L.rows_p = (rows + L.pack_factor - 1) / L.pack_factor * L.pack_factor;
  return L;
}

IntGroupQuant int_group_quant(float mn, float mx, int bits, bool sym) {
  IntGroupQuant q{};
  if (sym) {
    const float half_range = static_cast<float>(1 << (bits - 1));
    // Upstream keeps the sign: the scale is negative when the positive extreme dominates (ties included).
    const float s = (mx < -mn) ? (-mn) / half_range : (-mx) / half_range;
    uint16_t h = float_to_fp16(s);
    if (fp16_is_negative(h)) {
      if (fp16_to_float(h) > -fp16_to_float(kMinScaleFp16)) h = kMinScaleFp16 | 0x8000u;
    } else if (fp16_to_float(h) < fp16_to_float(kMinScaleFp16)) {
      h = kMinScaleFp16;
    }
    q.scale_fp16 = h;
    q.scale = fp16_to_float(h);
    q.zero = 1 << (bits - 1);
  } else {
    const float s = (mx - mn) / static_cast<float>((1 << bits) - 1);
    uint16_t h = float_to_fp16(s);
    if (fp16_is_negative(h) || fp16_to_float(h) < fp16_to_float(kMinScaleFp16)) h = kMinScaleFp16;
    q.scale_fp16 = h;
    q.scale = fp16_to_float(h);
    q.zero = static_cast<int32_t>(std::nearbyint(-mn / q.scale));
  }
  return q;
}

void quantize_int_rtn_ref(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p, uint8_t* codes,
                          int32_t* zeros, uint16_t* scales) {
  const int maxq = (1 << p.bits) - 1;
  for (int64_t r = 0; r < L.rows_p; ++r)
    for (int64_t g = 0; g < L.groups; ++g) {
      auto value = [&](int64_t c) { return (r < L.rows && c < L.cols) ? load_element(src, w, r * L.cols + c) : 0.0f; };
      float mn = 0.0f, mx = 0.0f;
      for (int64_t c = g * L.group; c < (g + 1) * L.group; ++c) {
        mn = std::min(mn, value(c));
        mx = std::max(mx, value(c));
      }
      const IntGroupQuant q = int_group_quant(mn, mx, p.bits, p.sym);
      zeros[r * L.groups + g] = q.zero;
      if (r >= L.rows) continue;
      scales[g * L.rows + r] = q.scale_fp16;
      for (int64_t c = g * L.group; c < (g + 1) * L.group; ++c) {
        const float code = std::nearbyint(value(c) / q.scale) + static_cast<float>(q.zero);
        codes[r * L.cols_p + c] = static_cast<uint8_t>(std::clamp(code, 0.0f, static_cast<float>(maxq)));
      }
    }
}

void quantize_int_gptq_ref(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p,
                           int32_t* qweight, int32_t* qzeros, uint16_t* scales) {
  std::vector<uint8_t> codes(static_cast<size_t>(L.rows * L.cols_p));
  std::vector<int32_t> zeros(static_cast<size_t>(L.rows_p * L.groups));
  quantize_int_rtn_ref(src, w, L, p, codes.data(), zeros.data(), scales);
  pack_gptq_qweight_ref(codes.data(), L.rows, L.cols_p, p.bits, qweight);
  pack_gptq_qzeros_ref(zeros.data(), L.rows_p, L.groups, p.bits, p.zero_offset, qzeros);
}

void quantize_int_gptq(DType src, const void* w, const IntGptqLayout& L, const IntQuantParams& p, int32_t* qweight,
                       int32_t* qzeros, uint16_t* scales) {
  if (!dtype_is_float_weight(src))
    throw OptionError("[quantize_int_gptq] unsupported source dtype " + std::string(dtype_name(src)));
  // The single choke point where runtime bits become a template argument.
  switch (p.bits) {
    case 2: return quantize_int_gptq_tiles<2>(src, w, L, p.sym, p.zero_offset, qweight, qzeros, scales);
    case 4: return quantize_int_gptq_tiles<4>(src, w, L, p.sym, p.zero_offset, qweight, qzeros, scales);
    case 8: return quantize_int_gptq_tiles<8>(src, w, L, p.sym, p.zero_offset, qweight, qzeros, scales);
    default: throw OptionError("[quantize_int_gptq] bits must be 2, 4 or 8, got " + std::to_string(p.bits));
  }
}

void dequantize_int_gptq_ref(const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales,
                             const IntGptqLayout& L, const IntQuantParams& p, float* out) {
  std::vector<uint8_t> codes(static_cast<size_t>(L.rows * L.cols_p));
  std::vector<int32_t> zeros(static_cast<size_t>(L.rows_p * L.groups));
  unpack_gptq_qweight_ref(qweight, L.rows, L.cols_p, p.bits, codes.data());
  unpack_gptq_qzeros_ref(qzeros, L.rows_p, L.groups, p.bits, p.zero_offset, zeros.data());
  for (int64_t r = 0; r < L.rows; ++r)
    for (int64_t c = 0; c < L.cols; ++c) {
      const int64_t g = c / L.group;
      const float s = fp16_to_float(scales[g * L.rows + r]);
      out[r * L.cols + c] = static_cast<float>(codes[r * L.cols_p + c] - zeros[r * L.groups + g]) * s;
    }
}

}  // namespace fastround
