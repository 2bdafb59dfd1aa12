// The AVX-512 woq kernels: woq_kernels.inc over 16-lane vectors (see there for why headers come first).
#include "fastround/infer/woq_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq")

namespace fastround::infer::detail {
namespace {

struct Vec {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  static constexpr int kGptqMr = 4;  // 16 accumulators of 4 output vectors
  static constexpr int kAwqMr = 2;   // 16 accumulators of 8 nibble slots
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1i(int v) { return _mm512_set1_epi32(v); }
  static F field(I w, int shift, I mask) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, static_cast<unsigned>(shift)), mask));
  }
  static constexpr bool kLut16 = true;
  static F iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static F lut16(I w, int shift, F table) {
    return _mm512_permutexvar_ps(shift ? _mm512_srli_epi32(w, static_cast<unsigned>(shift)) : w, table);
  }
  static I srlv(I w, I s) { return _mm512_srlv_epi32(w, s); }
  static I permute(I idx, I v) { return _mm512_permutexvar_epi32(idx, v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F gather(const float* base, I idx) { return _mm512_i32gather_ps(idx, base, 4); }
  static F load_scales(const void* p, DType dt) {
    if (dt == DType::F32) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    if (dt == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
  // RNE to bf16 as fp_codes.h's float_to_bf16 (finite values: the weights of finite scales).
  static void store_bf16(uint16_t* p, F v) {
    const I u = _mm512_castps_si512(v);
    const I r = _mm512_add_epi32(u, _mm512_add_epi32(set1i(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), set1i(1))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
};

}  // namespace
}  // namespace fastround::infer::detail

#define FR_WOQ_NS avx512
#define FR_WOQ_TABLE kWoqAvx512
#include "fastround/infer/woq_kernels.inc"
#pragma GCC pop_options
#endif
