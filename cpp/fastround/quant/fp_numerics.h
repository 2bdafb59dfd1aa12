// Element numerics of the small-float quantizers (upstream's torch ops, one element at a time), shared by the
// reference, the scalar fast path and the SIMD kernels, which fall back to these for any group they cannot
// prove they handle bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fastround/common/convert.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/quant/fp_rtn.h"

namespace fastround::fpq {


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

// Quantize-dequantize one 32-group with shared exponent e; returns the squared-error loss, each square times
// qw[i] when loss weights are given (the regular flow's imatrix; the square rounds first, as upstream's mul_).
template <int BITS>
inline float mx_qdq_group(const float* x, float e, float* q, const float* qw = nullptr) {
  const float sc = pow2f(e), inv_sc = pow2f(-e);  // x * 2^-e == x / 2^e bit for bit
  float sq[32];
  for (int i = 0; i < 32; ++i) {
    const float t = clampf(x[i] * inv_sc, -MxTraits<BITS>::kMaxNorm, MxTraits<BITS>::kMaxNorm);
    q[i] = mx_round_element<BITS>(t) * sc;
    const float d = q[i] - x[i];
    sq[i] = d * d;
    if (qw != nullptr) sq[i] *= qw[i];
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

// One 32-group of a row: shared exponent (searched when opt_rtn, its loss weighted by qw[32] when given), scale
// byte and one code byte per element.
template <int BITS>
inline void mx_group(const float* xg, DType src, bool opt_rtn, uint8_t* codes, uint8_t* scale,
                     const float* qw = nullptr) {
  float q[32], cand[32];
  float m = 0.0f;
  for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xg[i]));
  float e = mx_shared_exponent<BITS>(m);
  float loss = mx_qdq_group<BITS>(xg, e, q, qw);
  if (opt_rtn) {
    const float e0 = e;
    for (float mult : {0.5f, 2.0f}) {
      const float ce = mx_shared_exponent<BITS>(m * mult);
      if (ce == e0) continue;  // same exponent, same loss: never strictly lower
      const float closs = mx_qdq_group<BITS>(xg, ce, cand, qw);
      if (closs < loss) {
        loss = closs;
        e = ce;
        std::copy(cand, cand + 32, q);
      }
    }
  }
  *scale = static_cast<uint8_t>(e + 127.0f);
  const float sc = pow2f(e);
  // Upstream returns the dequantized weight in the source dtype, then divides by the scale to encode.
  for (int i = 0; i < 32; ++i) {
    const float s = round_to_dtype(src, q[i]) / sc;
    codes[i] = BITS == 4 ? e2m1_code(s) : e4m3_code(s);
  }
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

// Upstream's scale search for one 16-group (the reference the SIMD search must match).
inline NvScale nv_best_scale(const float* x, bool opt_rtn) {
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

}  // namespace fastround::fpq
