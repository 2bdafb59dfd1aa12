#include "fastround/quant/fp_rtn.h"

#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"

namespace fastround {

namespace {

// ---- numerics shared by the reference and the fast path (upstream's torch ops, one element at a time) ----

// floor(log2(a)) of a correctly rounded fp32 log2, as torch computes it: rounding can reach the next
// integer for mantissas just below 2. The exponent bits give the answer except there (and for subnormals),
// where the double log2 decides.
inline float floor_log2_exact(float a) { return std::floor(static_cast<float>(std::log2(static_cast<double>(a)))); }

inline float floor_log2(float a) {
  const uint32_t u = float_bits(a);
  const uint32_t exp = (u >> 23) & 0xFFu;
  if (exp == 0 || exp == 0xFFu || (u & 0x7FFFFFu) >= 0x7FFE00u) return floor_log2_exact(a);  // top 2^-14 of the binade
  return static_cast<float>(static_cast<int>(exp) - 127);
}

// 2^e for an integer-valued e, exact (subnormal results included).
inline float pow2f(float e) {
  const int k = static_cast<int>(e);
  if (k >= -126 && k <= 127) return bits_float(static_cast<uint32_t>(k + 127) << 23);
  return std::ldexp(1.0f, k);
}

// floor for 0 <= v < 2^31 without a libm call.
inline float floor_nonneg(float v) { return static_cast<float>(static_cast<int32_t>(v)); }

// Round half to even for 0 <= v < 2^22 without a libm call (the 2^23 magic number).
inline float rne_nonneg(float v) {
  constexpr float kMagic = 8388608.0f;  // exact IEEE adds: the compiler may not fold this without -ffast-math
  return (v + kMagic) - kMagic;
}

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// torch.sign: +0 for either zero.
inline float signf(float v) { return static_cast<float>((v > 0.0f) - (v < 0.0f)); }

// torch CPU's float32 sum over a contiguous last dim of 16 or 32: 8 vector lanes, then the lanes in order.
template <int N>
inline float torch_sum_lanes8(const float* v) {
  float lanes[8];
  for (int l = 0; l < 8; ++l) {
    float a = N == 16 ? 0.0f + v[l] : v[l];
    for (int k = 1; k < N / 8; ++k) a += v[8 * k + l];
    lanes[l] = a;
  }
  float acc = 0.0f;
  for (int l = 0; l < 8; ++l) acc += lanes[l];
  return acc;
}

template <int BITS>
struct MxTraits;
template <>
struct MxTraits<4> {  // E2M1
  static constexpr float kEmax = 2.0f, kMaxNorm = 6.0f, kMinP = 0.0f, kMscale = 2.0f;
};
template <>
struct MxTraits<8> {  // E4M3
  static constexpr float kEmax = 8.0f, kMaxNorm = 448.0f, kMinP = -6.0f, kMscale = 8.0f;
};

// Element rounding of upstream's _quant_element: scale into the private exponent's mantissa grid, round half
// to even written as floor(|u|+0.5) minus one when |u|-0.5 is an even integer, scale back, saturate.
template <int BITS>
inline float mx_round_element(float t) {
  using T = MxTraits<BITS>;
  const float a0 = std::fabs(t) + (t == 0.0f ? 1.0f : 0.0f);
  const float p = std::max(floor_log2(a0), T::kMinP);
  const float pw = pow2f(p);
  const float u = (t * pow2f(-p)) * T::kMscale;  // == t / pw: one correctly rounded op on the same value
  const float a = std::fabs(u);
  const float half_off = a - 0.5f;
  // torch.remainder(|u| - 0.5, 2) == 0: |u| - 0.5 is an even integer (|u| is at most 2^9 here).
  const float mask = (half_off >= 0.0f && floor_nonneg(half_off) == half_off &&
                      (static_cast<int32_t>(half_off) & 1) == 0)
                         ? 1.0f
                         : 0.0f;
  const float r = signf(u) * (floor_nonneg(a + 0.5f) - mask);
  return clampf((r * (1.0f / T::kMscale)) * pw, -T::kMaxNorm, T::kMaxNorm);
}

// Shared exponent of a group whose (candidate) max is m; an all-zero group uses the literal exponent 1.
template <int BITS>
inline float mx_shared_exponent(float m) {
  const float e = m == 0.0f ? 1.0f : floor_log2(m);
  return clampf(e - MxTraits<BITS>::kEmax, -127.0f, 127.0f);
}

// Quantize-dequantize one 32-group with shared exponent e; returns the squared-error loss.
template <int BITS>
inline float mx_qdq_group(const float* x, float e, float* q) {
  const float sc = pow2f(e), inv_sc = pow2f(-e);  // x * 2^-e == x / 2^e bit for bit
  float sq[32];
  for (int i = 0; i < 32; ++i) {
    const float t = clampf(x[i] * inv_sc, -MxTraits<BITS>::kMaxNorm, MxTraits<BITS>::kMaxNorm);
    q[i] = mx_round_element<BITS>(t) * sc;
    const float d = q[i] - x[i];
    sq[i] = d * d;
  }
  return torch_sum_lanes8<32>(sq);
}

// E2M1 code of the nearest grid value (ties to the lower magnitude, NaN to 0), sign from the sign bit.
inline uint8_t e2m1_code(float s) {
  // On-grid values (the usual case) map straight from their bits: exponent and top mantissa bit.
  const uint32_t u = float_bits(s);
  const uint32_t mag = u & 0x7FFFFFFFu, exp = mag >> 23, man = mag & 0x7FFFFFu;
  const uint8_t sign = static_cast<uint8_t>((u >> 28) & 0x8u);
  if (mag == 0) return sign;
  if (exp >= 127 && exp <= 129 && (man & 0x3FFFFFu) == 0)
    return static_cast<uint8_t>(sign | (2 * (exp - 127) + 2 + (man >> 22)));
  if (mag == 0x3F000000u) return static_cast<uint8_t>(sign | 1u);  // 0.5
  const float a = std::fabs(s);
  uint8_t idx = 0;
  if (!std::isnan(a)) {
    float best = std::fabs(a - kE2M1Values[0]);
    for (uint8_t k = 1; k < 8; ++k) {
      const float d = std::fabs(a - kE2M1Values[k]);
      if (d < best) {
        best = d;
        idx = k;
      }
    }
  }
  return static_cast<uint8_t>(idx | (std::signbit(s) ? 0x8u : 0x0u));
}

inline uint8_t e4m3_code(float s) {
  if (std::fabs(s) >= 480.0f) return static_cast<uint8_t>((std::signbit(s) ? 0x80u : 0u) | 0x7Fu);  // torch: NaN
  return float_to_fp8_e4m3(s);
}

// Quantizes one row's groups into codes (one byte per element) and scale bytes.
template <int BITS>
void mx_row(const float* x, int64_t cols, DType src, bool opt_rtn, uint8_t* codes, uint8_t* scale) {
  float q[32], cand[32];
  for (int64_t g = 0; g < cols / 32; ++g) {
    const float* xg = x + g * 32;
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xg[i]));
    float e = mx_shared_exponent<BITS>(m);
    float loss = mx_qdq_group<BITS>(xg, e, q);
    if (opt_rtn) {
      const float e0 = e;
      for (float mult : {0.5f, 2.0f}) {
        const float ce = mx_shared_exponent<BITS>(m * mult);
        if (ce == e0) continue;  // same exponent, same loss: never strictly lower
        const float closs = mx_qdq_group<BITS>(xg, ce, cand);
        if (closs < loss) {
          loss = closs;
          e = ce;
          std::copy(cand, cand + 32, q);
        }
      }
    }
    scale[g] = static_cast<uint8_t>(e + 127.0f);
    const float sc = pow2f(e);
    // Upstream returns the dequantized weight in the source dtype, then divides by the scale to encode.
    for (int i = 0; i < 32; ++i) {
      const float s = round_to_dtype(src, q[i]) / sc;
      codes[g * 32 + i] = BITS == 4 ? e2m1_code(s) : e4m3_code(s);
    }
  }
}

void pack_nibbles(const uint8_t* codes, int64_t n, uint8_t* out) {
  for (int64_t k = 0; k < n / 2; ++k) out[k] = static_cast<uint8_t>(codes[2 * k] | (codes[2 * k + 1] << 4));
}

template <int BITS>
void quantize_mxfp_rows(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale) {
  parallel_for(L.rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(L.cols));
    std::vector<uint8_t> codes(BITS == 4 ? static_cast<size_t>(L.cols) : 0);
    load_as_float(src, w, r * L.cols, L.cols, x.data());
    uint8_t* out = BITS == 4 ? codes.data() : weight + r * L.cols;
    mx_row<BITS>(x.data(), L.cols, src, opt_rtn, out, scale + r * (L.cols / 32));
    if (BITS == 4) pack_nibbles(codes.data(), L.cols, weight + r * (L.cols / 2));
  });
}

// ---- NVFP4_E5M3 ----

constexpr float kUe5m3Max = 114688.0f;
constexpr float kOneSixth = static_cast<float>(1.0 / 6.0);

// RNE to the E2M1 grid by magnitude band, as upstream's cast_to_fp4 (sign via torch.sign).
inline float cast_to_fp4(float y) {
  const float sgn = std::isnan(y) ? 0.0f : signf(y);
  const float a = std::fabs(y);
  float r;
  if (std::isnan(a))
    r = a;
  else if (a < 2.0f)
    r = rne_nonneg(2.0f * a) / 2.0f;
  else if (a < 4.0f)
    r = rne_nonneg(a);
  else
    r = 2.0f * rne_nonneg(std::min(a, 16.0f) / 2.0f);  // anything above 12 clamps to 6 below
  r = std::isnan(r) ? r : clampf(r, -6.0f, 6.0f);
  return r * sgn;
}

struct NvScale {
  float d;  // decoded scale
  uint8_t byte;
};

inline NvScale nv_scale(float vmax, float mult) {
  const float sc = clampf((vmax * mult) * kOneSixth, 0.0f, kUe5m3Max);
  const uint8_t b = ue5m3_encode(sc);
  return {ue5m3_decode(b), b};
}

// The dequantize path of upstream's search and fake format: zero scale gives zero, -0 quotients become +0.
inline float nv_qdq(float x, float d) {
  float y = d == 0.0f ? 0.0f : x / d;
  y = clampf(y + 0.0f, -6.0f, 6.0f);
  return cast_to_fp4(y) * d;
}

inline float nv_group_loss(const float* x, float d) {
  float sq[16];
  for (int i = 0; i < 16; ++i) {
    const float diff = nv_qdq(x[i], d) - x[i];
    sq[i] = diff * diff;
  }
  return torch_sum_lanes8<16>(sq);
}

NvScale nv_best_scale(const float* x, bool opt_rtn) {
  float vmax = 0.0f;
  for (int i = 0; i < 16; ++i) vmax = std::max(vmax, std::fabs(x[i]));
  NvScale best = nv_scale(vmax, 1.0f);
  if (!opt_rtn) return best;
  float best_loss = nv_group_loss(x, best.d);
  // Many multipliers encode to the same scale byte; an equal loss never wins, so each byte is tried once.
  bool tried[256] = {};
  tried[best.byte] = true;
  for (int k = 50; k < 152; ++k) {
    if (k == 100) continue;
    const NvScale s = nv_scale(vmax, static_cast<float>(k / 100.0));
    if (tried[s.byte]) continue;
    tried[s.byte] = true;
    const float loss = nv_group_loss(x, s.d);
    if (loss < best_loss) {
      best_loss = loss;
      best = s;
    }
  }
  return best;
}

// Packed path: the quotient is not guarded against a zero scale (0/0 is NaN, code 0; x/0 saturates).
inline uint8_t nv_code(float x, float d) {
  float s = x / d;
  if (!std::isnan(s)) s = clampf(s, -6.0f, 6.0f);
  return e2m1_code(cast_to_fp4(s));
}

void check_nvfp4_shape(int64_t cols) {
  if (cols % 16 != 0)
    throw OptionError("[nvfp4_e5m3] in_features " + std::to_string(cols) + " is not a multiple of the group size 16");
}

}  // namespace

uint8_t ue5m3_encode(float v) {
  v = clampf(v, 0.0f, kUe5m3Max);
  constexpr float kMinNormal = 6.103515625e-05f;  // 2^-14
  if (v < kMinNormal) return static_cast<uint8_t>(std::min(254.0f, std::nearbyint(v * 131072.0f)));  // step 2^-17
  int ex = 0;
  const float mant = std::frexp(v, &ex);  // v = mant * 2^ex, mant in [0.5, 1)
  int m3 = static_cast<int>(std::nearbyint((mant - 0.5f) * 16.0f));
  int e5 = ex + 14;
  if (m3 == 8) {  // rounding carried into the exponent
    m3 = 0;
    ++e5;
  }
  const int code = (e5 << 3) | m3;
  return static_cast<uint8_t>(std::max(0, std::min(254, code)));
}

float ue5m3_decode(uint8_t b) {
  if (b == 0) return 0.0f;
  const int e = (b >> 3) & 31, m = b & 7;
  if (e == 31 && m == 7) return std::nanf("");
  if (e == 0) return (static_cast<float>(m) / 8.0f) * 6.103515625e-05f;
  return std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 15);
}

MxfpLayout mxfp_layout(int64_t rows, int64_t cols, int bits, const char* site) {
  if (bits != 4 && bits != 8)
    throw OptionError(std::string("[mxfp] ") + site + ": bits must be 4 or 8, got " + std::to_string(bits));
  if (cols % 32 != 0)
    throw OptionError(std::string("[mxfp] ") + site + ": in_features " + std::to_string(cols) +
                      " is not a multiple of the MX group size 32");
  return MxfpLayout{rows, cols, bits};
}

// Reference: whole-tensor passes in upstream's order (group maxima, each candidate over all groups, the
// selection, then encoding and packing), one element at a time.
void quantize_mxfp_ref(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale) {
  const int64_t n = L.rows * L.cols, groups = n / 32;
  std::vector<float> x(static_cast<size_t>(n));
  load_as_float(src, w, 0, n, x.data());
  std::vector<float> m(static_cast<size_t>(groups), 0.0f);
  for (int64_t g = 0; g < groups; ++g)
    for (int i = 0; i < 32; ++i) m[g] = std::max(m[g], std::fabs(x[g * 32 + i]));
  auto run = [&](float mult, std::vector<float>& e, std::vector<float>& q, std::vector<float>& loss) {
    e.resize(groups);
    q.resize(n);
    loss.resize(groups);
    for (int64_t g = 0; g < groups; ++g) {
      e[g] = L.bits == 4 ? mx_shared_exponent<4>(m[g] * mult) : mx_shared_exponent<8>(m[g] * mult);
      loss[g] = L.bits == 4 ? mx_qdq_group<4>(&x[g * 32], e[g], &q[g * 32]) : mx_qdq_group<8>(&x[g * 32], e[g], &q[g * 32]);
    }
  };
  std::vector<float> e, q, loss, ce, cq, closs;
  run(1.0f, e, q, loss);
  if (opt_rtn)
    for (float mult : {0.5f, 2.0f}) {
      run(mult, ce, cq, closs);
      for (int64_t g = 0; g < groups; ++g)
        if (closs[g] < loss[g]) {
          loss[g] = closs[g];
          e[g] = ce[g];
          std::copy(&cq[g * 32], &cq[g * 32] + 32, &q[g * 32]);
        }
    }
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float s = round_to_dtype(src, q[i]) / pow2f(e[i / 32]);
    codes[i] = L.bits == 4 ? e2m1_code(s) : e4m3_code(s);
  }
  for (int64_t g = 0; g < groups; ++g) scale[g] = static_cast<uint8_t>(e[g] + 127.0f);
  if (L.bits == 4)
    pack_nibbles(codes.data(), n, weight);
  else
    std::copy(codes.begin(), codes.end(), weight);
}

void quantize_mxfp(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale) {
  require_float_source(src, "quantize_mxfp");
  if (L.bits == 4)
    quantize_mxfp_rows<4>(src, w, L, opt_rtn, weight, scale);
  else
    quantize_mxfp_rows<8>(src, w, L, opt_rtn, weight, scale);
}

void dequantize_mxfp_ref(const uint8_t* weight, const uint8_t* scale, const MxfpLayout& L, float* out) {
  for (int64_t r = 0; r < L.rows; ++r)
    for (int64_t c = 0; c < L.cols; ++c) {
      const float s = e8m0_to_float(scale[r * (L.cols / 32) + c / 32]);
      float v;
      if (L.bits == 4) {
        const uint8_t b = weight[r * (L.cols / 2) + c / 2];
        v = e2m1_to_float((c & 1) ? (b >> 4) : (b & 0xF));
      } else {
        v = fp8_e4m3_to_float(weight[r * L.cols + c]);
      }
      out[r * L.cols + c] = v * s;
    }
}

void quantize_nvfp4_e5m3_ref(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, uint8_t* packed,
                             uint8_t* scale) {
  check_nvfp4_shape(cols);
  const int64_t n = rows * cols;
  std::vector<float> x(static_cast<size_t>(n));
  load_as_float(src, w, 0, n, x.data());
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  for (int64_t g = 0; g < n / 16; ++g) {
    const NvScale s = nv_best_scale(&x[g * 16], opt_rtn);
    scale[g] = s.byte;
    for (int i = 0; i < 16; ++i) codes[g * 16 + i] = nv_code(x[g * 16 + i], s.d);
  }
  pack_nibbles(codes.data(), n, packed);
}

void quantize_nvfp4_e5m3(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, uint8_t* packed,
                         uint8_t* scale) {
  require_float_source(src, "quantize_nvfp4_e5m3");
  check_nvfp4_shape(cols);
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(cols));
    load_as_float(src, w, r * cols, cols, x.data());
    uint8_t* out = packed + r * (cols / 2);
    for (int64_t g = 0; g < cols / 16; ++g) {
      const NvScale s = nv_best_scale(&x[g * 16], opt_rtn);
      scale[r * (cols / 16) + g] = s.byte;
      for (int i = 0; i < 16; i += 2)
        out[g * 8 + i / 2] =
            static_cast<uint8_t>(nv_code(x[g * 16 + i], s.d) | (nv_code(x[g * 16 + i + 1], s.d) << 4));
    }
  });
}

void fake_quantize_nvfp4_e5m3(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, void* out) {
  require_float_source(src, "fake_quantize_nvfp4_e5m3");
  check_nvfp4_shape(cols);
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(cols)), q(static_cast<size_t>(cols));
    load_as_float(src, w, r * cols, cols, x.data());
    for (int64_t g = 0; g < cols / 16; ++g) {
      const NvScale s = nv_best_scale(&x[g * 16], opt_rtn);
      for (int i = 0; i < 16; ++i) q[g * 16 + i] = nv_qdq(x[g * 16 + i], s.d);
    }
    store_from_float(src, q.data(), cols, out, r * cols);
  });
}

void dequantize_nvfp4_e5m3_ref(const uint8_t* packed, const uint8_t* scale, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t b = packed[r * (cols / 2) + c / 2];
      out[r * cols + c] = e2m1_to_float((c & 1) ? (b >> 4) : (b & 0xF)) * ue5m3_decode(scale[r * (cols / 16) + c / 16]);
    }
}

}  // namespace fastround
