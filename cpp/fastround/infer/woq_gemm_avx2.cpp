// The AVX2 woq kernels: woq_kernels.inc over 8-lane vectors (see there for why headers come first).
#include "fastround/infer/woq_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")

namespace fastround::infer::detail {
namespace {

struct Vec {
  using F = __m256;
  using I = __m256i;
  static constexpr int L = 8;
  static constexpr int kGptqMr = 2;  // 16 registers: 8 accumulators, 4 words, the rest temporaries
  static constexpr int kGptqWide = 4;  // output vectors per GEMV block (x one row at a time)
  static constexpr int kAwqMr = 1;
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1i(int v) { return _mm256_set1_epi32(v); }
  static F field(I w, int shift, I mask) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, shift), mask));
  }
  static constexpr bool kLut16 = false;  // vpermps indexes 8 entries
  static F iota() { return _mm256_setzero_ps(); }
  static F lut16(I, int, F t) { return t; }
  static I srlv(I w, I s) { return _mm256_srlv_epi32(w, s); }
  static I permute(I idx, I v) { return _mm256_permutevar8x32_epi32(v, idx); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F gather(const float* base, I idx) { return _mm256_i32gather_ps(base, idx, 4); }
  static F load_scales(const void* p, DType dt) {
    if (dt == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p));
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if (dt == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
  // RNE to bf16 as fp_codes.h's float_to_bf16 (finite values: the weights of finite scales).
  static void store_bf16(uint16_t* p, F v) {
    const I u = _mm256_castps_si256(v);
    const I r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(set1i(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), set1i(1)))), 16);
    // Each lane is below 2^16, so the signed-saturating pack is exact.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

}  // namespace
}  // namespace fastround::infer::detail

#define FR_WOQ_NS avx2
#define FR_WOQ_TABLE kWoqAvx2
#include "fastround/infer/woq_kernels.inc"
#pragma GCC pop_options
#endif
