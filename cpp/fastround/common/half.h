// Scalar IEEE half / bfloat16 conversions, exact and independent of the FPU mode
// (except fp32->fp16 subnormals, which use nearbyint under the default round-to-nearest-even).
// The CUDA tuning kernels call these same functions in device code, so both sides round alike.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTROUND_HD __host__ __device__
#else
#define FASTROUND_HD
#endif

namespace fastround {

FASTROUND_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FASTROUND_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FASTROUND_HD inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

FASTROUND_HD inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24
    return bits_float(float_bits(v) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round-to-nearest-even, as torch's Tensor.to(torch.float16) does.
FASTROUND_HD inline uint16_t float_to_fp16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                                // below 2^-14: half subnormal
    const float scaled = bits_float(a) * 16777216.0f;                   // exact: power-of-two scaling
#if defined(__CUDA_ARCH__)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(scaled)));
#else
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
#endif
  }
  a += 0xFFFu + ((a >> 13) & 1u);
  a -= 0x38000000u;  // rebias exponent 127 -> 15
  return static_cast<uint16_t>(sign | (a >> 13));
}

inline bool fp16_is_negative(uint16_t h) { return (h & 0x8000u) != 0 && (h & 0x7FFFu) != 0; }

}  // namespace fastround
