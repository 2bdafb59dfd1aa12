// The AVX-512 woq kernels: woq_kernels.inc over 16-lane vectors (see there for why headers come first).
#include "fastround/infer/woq_simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"

// GCC 12 reports its own _mm512_undefined_* placeholders inside avx512fintrin.h as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq")

namespace fastround::infer::detail {
namespace {

struct Vec {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  static constexpr int kGptqMr = 4;  // 16 accumulators of 4 output vectors
  static constexpr int kGptqWide = 16;  // output vectors per GEMV block (x one row at a time)
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

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq")

namespace fastround::infer::detail {

namespace {

// GPTQ words straight into dst [out, in]: 16 inputs of one output are 16/PF words of one qweight column, gathered
// into one vector by permutes of 16/PF loaded rows, so each output row is written 16 values at a time.
template <int BITS>
void gptq_dequant_outputs(const WoqWeightView& w, DType dt, void* dst, int64_t o0) {
  constexpr int PF = 32 / BITS, NW = 16 / PF > 0 ? 16 / PF : 1;  // words per 16-input vector (2-bit: half a word)
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  alignas(64) int32_t shift[16];
  for (int i = 0; i < 16; ++i) shift[i] = (i % PF) * BITS;
  const __m512i shv = _mm512_load_si512(shift);
  const int64_t kv = w.in / 16;  // whole vectors of inputs; a group holds whole vectors
  float z[16], s[16];
  for (int64_t v = 0; v < kv; ++v) {
    const int64_t k0 = v * 16, g = k0 / w.group;
    if (v == 0 || k0 % w.group == 0)
      for (int i = 0; i < 16; ++i) {
        z[i] = static_cast<float>(woq_zero(w, g, o0 + i));
        s[i] = woq_scale(w, g, o0 + i);
      }
    const int32_t* qp = w.qrow(k0 / PF, o0);
    __m512i rows[4];
    for (int r = 0; r < NW; ++r) rows[r] = _mm512_loadu_si512(qp + r * w.qrow_stride());
    for (int i = 0; i < 16; ++i) {
      __m512i words;
      if constexpr (BITS == 2) {
        // lanes 0-15: inputs k0 .. k0+15 are fields 0-15 of word (k0/16, o0+i)
        words = _mm512_permutexvar_epi32(_mm512_set1_epi32(i), rows[0]);
      } else if constexpr (BITS == 4) {
        const __m512i idx = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(i), _mm512_set1_epi32(16 + i));
        words = _mm512_permutex2var_epi32(rows[0], idx, rows[1]);
      } else {
        const __m512i idx = _mm512_mask_blend_epi32(0xF0F0, _mm512_set1_epi32(i), _mm512_set1_epi32(16 + i));
        words = _mm512_mask_blend_epi32(0xFF00, _mm512_permutex2var_epi32(rows[0], idx, rows[1]),
                                        _mm512_permutex2var_epi32(rows[2], idx, rows[3]));
      }
      const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shv), mask));
      const __m512 val = _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(z[i])), _mm512_set1_ps(s[i]));
      const int64_t at = (o0 + i) * w.in + k0;
      if (dt == DType::BF16) Vec::store_bf16(static_cast<uint16_t*>(dst) + at, val);
      else _mm512_storeu_ps(static_cast<float*>(dst) + at, val);
    }
  }
}

}  // namespace

bool gptq_dequantize_avx512(const WoqWeightView& w, DType dt, void* dst) {
  if (w.layout == WoqLayout::Awq || w.group % 16 != 0 || w.out % 16 != 0) return false;
  parallel_for(w.out / 16, [&](int64_t b) {
    switch (w.bits) {
      case 2: gptq_dequant_outputs<2>(w, dt, dst, b * 16); break;
      case 4: gptq_dequant_outputs<4>(w, dt, dst, b * 16); break;
      default: gptq_dequant_outputs<8>(w, dt, dst, b * 16); break;
    }
    // Inputs past the last whole vector (in not a multiple of 16), element by element.
    for (int64_t o = b * 16; o < b * 16 + 16; ++o)
      for (int64_t k = w.in / 16 * 16; k < w.in; ++k) {
        const float v = woq_weight(w, k, o);
        if (dt == DType::BF16) static_cast<uint16_t*>(dst)[o * w.in + k] = float_to_bf16(v);
        else static_cast<float*>(dst)[o * w.in + k] = v;
      }
  });
  return true;
}

}  // namespace fastround::infer::detail
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace fastround::infer::detail {

namespace {

// outputs [o0, o0 + NV*16) of one row of x: acc = sum x * (128 + q) per group, then y += s * (acc - (z + 128) * sum x).
// Few vectors (a tile's 4) take two accumulator sets, even and odd pairs, for twice as many dot-product chains.
template <int BITS, int NV>
void gptq_bf16_row(const WoqWeightView& w, const uint32_t* xp, const float* xsum, int64_t o0, int64_t g0, int64_t g1,
                   float* y) {
  constexpr int PF = 32 / BITS, HP = PF / 2;
  constexpr uint32_t kMaxq = (1u << BITS) - 1u;
  const __m512i pair_mask = _mm512_set1_epi32(static_cast<int>(kMaxq | (kMaxq << 16)));
  const __m512i magic = _mm512_set1_epi32(0x43004300);  // bf16 128.0 in both halves: 128 + q, q < 128, is exact
  const __m512i zmask = _mm512_set1_epi32(static_cast<int>(kMaxq));
  const int64_t rows = w.qweight_rows(), gw = w.group / PF, zc = w.qzeros_cols();
  alignas(64) int32_t zidx[16], zshift[16];
  for (int i = 0; i < 16; ++i) {
    zidx[i] = i / PF;
    zshift[i] = (i % PF) * BITS;
  }
  const __m512i zidxv = _mm512_load_si512(zidx), zshiftv = _mm512_load_si512(zshift);
  const __m512 zoff = _mm512_set1_ps(static_cast<float>(w.zero_offset() + 128));
  const size_t sbytes = static_cast<size_t>(dtype_bits(w.scale_dtype) / 8);
  constexpr int NA = NV <= 4 && HP >= 2 ? 2 : 1;
  const int64_t qs = w.qrow_stride();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc2[NA][NV];
    for (int a = 0; a < NA; ++a)
      for (int v = 0; v < NV; ++v) acc2[a][v] = _mm512_setzero_ps();
    const int64_t kw0 = g * gw, kw1 = std::min(kw0 + gw, rows);
    const int32_t* qp = w.qrow(kw0, o0);
    for (int64_t kw = kw0; kw < kw1; ++kw, qp += qs) {
      for (int line = 0; line < NV * 64; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qp + 16 * qs) + line, _MM_HINT_T0);
      __m512i xb[HP];
      for (int j = 0; j < HP; ++j) xb[j] = _mm512_set1_epi32(static_cast<int>(xp[kw * HP + j]));
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m512i wv = _mm512_loadu_si512(qp + v * 16);
#pragma GCC unroll 8
        for (int j = 0; j < HP; ++j) {
          const __m512i sh = j ? _mm512_srli_epi32(wv, static_cast<unsigned>(BITS * j)) : wv;
          const __m512i q2 = _mm512_ternarylogic_epi32(sh, pair_mask, magic, 0xEA);  // (sh & mask) | magic
          acc2[j % NA][v] = _mm512_dpbf16_ps(acc2[j % NA][v], reinterpret_cast<__m512bh>(q2),
                                             reinterpret_cast<__m512bh>(xb[j]));
        }
      }
    }
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = NA == 2 ? _mm512_add_ps(acc2[0][v], acc2[NA - 1][v]) : acc2[0][v];
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    for (int v = 0; v < NV; ++v) {
      const int64_t o = o0 + v * 16;
      alignas(64) int32_t words[16] = {};
      const int64_t nw = std::min<int64_t>(16 / PF + (16 % PF ? 1 : 0), zc - o / PF);
      for (int64_t i = 0; i < nw; ++i) words[i] = w.qzeros[g * zc + o / PF + i];
      const __m512i zw = _mm512_srlv_epi32(_mm512_permutexvar_epi32(zidxv, _mm512_load_si512(words)), zshiftv);
      const __m512 z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_and_si512(zw, zmask)), zoff);
      const char* sp = static_cast<const char*>(w.scales) + static_cast<size_t>(g * w.out + o) * sbytes;
      const __m512 s = Vec::load_scales(sp, w.scale_dtype);
      const __m512 t = _mm512_sub_ps(acc[v], _mm512_mul_ps(z, xs));
      _mm512_storeu_ps(y + o, _mm512_fmadd_ps(s, t, _mm512_loadu_ps(y + o)));
    }
  }
}

}  // namespace

int64_t gptq_bf16_block_outputs(const WoqWeightView& w) {
  if (!__builtin_cpu_supports("avx512bf16")) return 0;
  return w.tile ? kWoqTile : 16 * 16;
}

void gptq_bf16_block(const WoqWeightView& w, const GemvBf16Ctx& c, int64_t o0, int64_t g0, int64_t g1, float* y) {
  for (int64_t r = 0; r < c.m; ++r) {
    const uint32_t* xp = c.xpair + r * c.ld2;
    const float* xs = c.xsum + r * w.groups;
    float* yr = y + r * w.out;
    // A tiled layer's block is one tile of 4 vectors (kWoqTile outputs).
    static_assert(kWoqTile == 64, "the tiled instantiations below cover 64 outputs");
    if (w.bits == 2 && w.tile) {
      gptq_bf16_row<2, 2>(w, xp, xs, o0, g0, g1, yr);
      gptq_bf16_row<2, 2>(w, xp, xs, o0 + 32, g0, g1, yr);
    } else if (w.tile) {
      gptq_bf16_row<4, 4>(w, xp, xs, o0, g0, g1, yr);
    } else if (w.bits == 2) {
      gptq_bf16_row<2, 8>(w, xp, xs, o0, g0, g1, yr);
      gptq_bf16_row<2, 8>(w, xp, xs, o0 + 128, g0, g1, yr);
    } else {
      gptq_bf16_row<4, 16>(w, xp, xs, o0, g0, g1, yr);
    }
  }
}

}  // namespace fastround::infer::detail
#pragma GCC pop_options
#endif
