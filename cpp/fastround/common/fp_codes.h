// Bit-pattern codecs for the small float formats checkpoints store: FP8 E4M3 (float8_e4m3fn), FP4 E2M1,
// E8M0 shared exponents. Decoding is exact; these are the only definitions the core uses.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastround/common/half.h"

namespace fastround {

// float8_e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN, max 448.
inline float fp8_e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu;
  const uint32_t mant = b & 0x7u;
  if (exp == 0xFu && mant == 0x7u) return bits_float(sign | 0x7FC00000u);
  if (exp == 0) return bits_float(float_bits(static_cast<float>(mant) * (1.0f / 512.0f)) | sign);  // mant * 2^-9
  return bits_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

// Round-to-nearest-even to float8_e4m3fn, saturating finite values to +-448 (inputs are already clamped
// by the quantizers, so saturation only matters for the encode-any-float helper).
inline uint8_t float_to_fp8_e4m3(float f) {
  const uint32_t x = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint8_t>(sign | 0x7Fu);
  if (a >= 464.0f) return static_cast<uint8_t>(sign | 0x7Eu);  // 464 is the midpoint above 448
  if (a < 0.015625f) {                                          // below 2^-6: subnormal, step 2^-9
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(a * 512.0f));
    return static_cast<uint8_t>(sign | m);  // m == 8 is the smallest normal, encoded the same way
  }
  uint32_t u = float_bits(a);
  u += 0x7FFFFu + ((u >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, ties to even
  const uint32_t exp = (u >> 23) - 120u;
  return static_cast<uint8_t>(sign | (exp << 3) | ((u >> 20) & 0x7u));
}

// E2M1 magnitudes by code (bit 3 is the sign).
inline constexpr float kE2M1Values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

inline float e2m1_to_float(uint8_t code) {
  const float v = kE2M1Values[code & 0x7u];
  return (code & 0x8u) ? -v : v;
}

// E8M0: 2^(b-127); 0xFF is NaN.
inline float e8m0_to_float(uint8_t b) {
  if (b == 0xFFu) return bits_float(0x7FC00000u);
  if (b == 0) return bits_float(0x00400000u);  // 2^-127, a float subnormal
  return bits_float(static_cast<uint32_t>(b) << 23);
}

FASTROUND_HD inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace fastround
