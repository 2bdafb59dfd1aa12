#include "fastround/transform/fwht.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"

namespace fastround::transform {

namespace {

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

template <typename C>
C norm_scale(const FwhtSpec& s) {
  return s.normalize ? static_cast<C>(1.0 / std::sqrt(static_cast<double>(s.n))) : C(1);
}

// H_K entry (k, k') of the operator actually applied: H_K, or H_K^T with `transpose`.
inline bool hadk_positive(const FwhtSpec& s, int64_t k, int64_t kp) {
  return (s.transpose ? s.hadk[kp * s.k + k] : s.hadk[k * s.k + kp]) > 0;
}

// ---- reference: one block at a time, every stage as the definition spells it ----

template <typename C>
void block_ref(C* v, C* tmp, const FwhtSpec& s) {
  const int64_t n = s.n, len = n / s.k;
  if (s.signs && s.signs_first)
    for (int64_t i = 0; i < n; ++i) v[i] = s.signs[i] > 0 ? v[i] : -v[i];
  for (int64_t h = 1; h < len; h *= 2)
    for (int64_t i = 0; i < n; ++i)
      if ((i & h) == 0) {
        const C a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
  if (s.k > 1) {
    for (int64_t k = 0; k < s.k; ++k)
      for (int64_t r = 0; r < len; ++r) {
        C acc = 0;
        for (int64_t kp = 0; kp < s.k; ++kp) acc = hadk_positive(s, k, kp) ? acc + v[kp * len + r] : acc - v[kp * len + r];
        tmp[k * len + r] = acc;
      }
    std::copy(tmp, tmp + n, v);
  }
  const C c = norm_scale<C>(s);
  if (s.normalize)
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * c;
  if (s.signs && !s.signs_first)
    for (int64_t i = 0; i < n; ++i) v[i] = s.signs[i] > 0 ? v[i] : -v[i];
}

// ---- fast path: the same operations, reordered only across independent elements ----

#define FR_INLINE __attribute__((always_inline)) inline

// The fast block is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC target_clones).
// Wider vectors change no result: every operation is one IEEE add, subtract or multiply (no FMA contraction).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_CLONES
#endif

// Strides 1, 2 and 4 on one 8-element group, unrolled (the vectorizer cannot pair elements that close).
template <typename C>
FR_INLINE void radix8(C* p) {
  C a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
  C a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
  C b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
  C b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
  p[0] = b0 + b4; p[4] = b0 - b4; p[1] = b1 + b5; p[5] = b1 - b5;
  p[2] = b2 + b6; p[6] = b2 - b6; p[3] = b3 + b7; p[7] = b3 - b7;
}

// out[k][r] = sum over k' of ±y[k'][r] for r in [r0, r0 + RB): RB accumulators the compiler keeps in registers
// while k' runs, instead of a load and store of `out` per k'. Same order of additions as the reference.
template <typename C, int64_t RB>
FR_INLINE void kstage_blocked(const C* __restrict v, C* __restrict tmp, const FwhtSpec& s, int64_t len) {
  for (int64_t k = 0; k < s.k; ++k)
    for (int64_t r0 = 0; r0 < len; r0 += RB) {
      C acc[RB];
      for (int64_t j = 0; j < RB; ++j) acc[j] = C(0);
      for (int64_t kp = 0; kp < s.k; ++kp) {
        const C* __restrict in = v + kp * len + r0;
        if (hadk_positive(s, k, kp)) {
          for (int64_t j = 0; j < RB; ++j) acc[j] = acc[j] + in[j];
        } else {
          for (int64_t j = 0; j < RB; ++j) acc[j] = acc[j] - in[j];
        }
      }
      for (int64_t j = 0; j < RB; ++j) tmp[k * len + r0 + j] = acc[j];
    }
}

template <typename C>
FR_INLINE void block_fast(C* __restrict v, C* __restrict tmp, const FwhtSpec& s, C c) {
  const int64_t n = s.n, len = n / s.k;
  if (s.signs && s.signs_first) {
    const int8_t* sg = s.signs;
    for (int64_t i = 0; i < n; ++i) v[i] = sg[i] > 0 ? v[i] : -v[i];
  }
  int64_t h = 1;
  if (len >= 8) {
    for (int64_t i = 0; i < n; i += 8) radix8(v + i);
    h = 8;
  }
  for (; h < len; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h) {
      C* __restrict lo = v + i;
      C* __restrict hi = v + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const C a = lo[j], b = hi[j];
        lo[j] = a + b;
        hi[j] = a - b;
      }
    }
  constexpr int64_t RB = 128 / sizeof(C);  // 32 floats / 16 doubles: two AVX-512 or four AVX2 registers
  if (s.k > 1 && len % RB == 0) {
    kstage_blocked<C, RB>(v, tmp, s, len);
    std::copy(tmp, tmp + n, v);
  } else if (s.k > 1) {
    for (int64_t k = 0; k < s.k; ++k) {
      C* __restrict out = tmp + k * len;
      std::fill(out, out + len, C(0));
      for (int64_t kp = 0; kp < s.k; ++kp) {
        const C* __restrict in = v + kp * len;
        if (hadk_positive(s, k, kp)) {
#pragma omp simd
          for (int64_t r = 0; r < len; ++r) out[r] = out[r] + in[r];
        } else {
#pragma omp simd
          for (int64_t r = 0; r < len; ++r) out[r] = out[r] - in[r];
        }
      }
    }
    std::copy(tmp, tmp + n, v);
  }
  if (s.normalize) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * c;
  }
  if (s.signs && !s.signs_first) {
    const int8_t* sg = s.signs;
    for (int64_t i = 0; i < n; ++i) v[i] = sg[i] > 0 ? v[i] : -v[i];
  }
}

FR_CLONES void block_fast_f32(float* v, float* tmp, const FwhtSpec& s, float c) { block_fast<float>(v, tmp, s, c); }
FR_CLONES void block_fast_f64(double* v, double* tmp, const FwhtSpec& s, double c) { block_fast<double>(v, tmp, s, c); }
inline void block_fast_any(float* v, float* tmp, const FwhtSpec& s, float c) { block_fast_f32(v, tmp, s, c); }
inline void block_fast_any(double* v, double* tmp, const FwhtSpec& s, double c) { block_fast_f64(v, tmp, s, c); }

// Blocks [b0, b1) of x: fp32/fp64 in place, half types through an fp32 copy of each block.
template <bool Fast>
void run_blocks(DType dt, void* x, int64_t b0, int64_t b1, const FwhtSpec& s) {
  const int64_t n = s.n;
  if (dt == DType::F64) {
    std::vector<double> tmp(s.k > 1 ? n : 0);
    const double c = norm_scale<double>(s);
    for (int64_t b = b0; b < b1; ++b) {
      double* v = static_cast<double*>(x) + b * n;
      Fast ? block_fast_any(v, tmp.data(), s, c) : block_ref(v, tmp.data(), s);
    }
    return;
  }
  std::vector<float> tmp(s.k > 1 ? n : 0);
  const float c = norm_scale<float>(s);
  if (dt == DType::F32) {
    for (int64_t b = b0; b < b1; ++b) {
      float* v = static_cast<float*>(x) + b * n;
      Fast ? block_fast_any(v, tmp.data(), s, c) : block_ref(v, tmp.data(), s);
    }
    return;
  }
  std::vector<float> buf(static_cast<size_t>(n));
  for (int64_t b = b0; b < b1; ++b) {
    load_as_float(dt, x, b * n, n, buf.data());
    Fast ? block_fast_any(buf.data(), tmp.data(), s, c) : block_ref(buf.data(), tmp.data(), s);
    store_from_float(dt, buf.data(), n, x, b * n);
  }
}

}  // namespace

void fwht_check(DType dtype, const void* x, int64_t rows, int64_t cols, const FwhtSpec& s, const char* site) {
  const std::string at = std::string("[") + site + "] ";
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::F16 && dtype != DType::BF16)
    throw OptionError(at + "x: dtype must be F32, F64, F16 or BF16, got " + std::string(dtype_name(dtype)));
  if (rows < 0 || cols < 0) throw OptionError(at + "x: negative shape");
  if (rows * cols > 0 && !x) throw OptionError(at + "x: null data");
  if (s.n <= 0) throw OptionError(at + "block_size: must be positive, got " + std::to_string(s.n));
  if (cols % s.n != 0)
    throw OptionError(at + "block_size: " + std::to_string(s.n) + " does not divide the last dimension " +
                      std::to_string(cols));
  if (s.k <= 0 || s.n % s.k != 0 || !is_pow2(s.n / s.k))
    throw OptionError(at + "hadamard_k: order " + std::to_string(s.k) + " does not split block_size " +
                      std::to_string(s.n) + " as K * 2^m");
  if (s.k > 1) {
    if (!s.hadk) throw OptionError(at + "hadamard_k: a " + std::to_string(s.k) + "x" + std::to_string(s.k) +
                                   " matrix is required");
    for (int64_t i = 0; i < s.k * s.k; ++i)
      if (s.hadk[i] != 1 && s.hadk[i] != -1) throw OptionError(at + "hadamard_k: entries must be +1 or -1");
  }
  if (s.signs)
    for (int64_t i = 0; i < s.n; ++i)
      if (s.signs[i] != 1 && s.signs[i] != -1) throw OptionError(at + "signs: entries must be +1 or -1");
}

void fwht_rows_ref(DType dtype, void* x, int64_t rows, int64_t cols, const FwhtSpec& spec) {
  fwht_check(dtype, x, rows, cols, spec, "fwht_rows_ref");
  if (rows * cols == 0) return;
  run_blocks<false>(dtype, x, 0, rows * (cols / spec.n), spec);
}

void fwht_rows(DType dtype, void* x, int64_t rows, int64_t cols, const FwhtSpec& spec) {
  fwht_check(dtype, x, rows, cols, spec, "fwht_rows");
  if (rows * cols == 0) return;
  const int64_t blocks = rows * (cols / spec.n);
  // ~32K elements per task: small blocks are batched, large ones go one per task; static chunks, so the split
  // never depends on the thread count (nor would the result: blocks are independent).
  const int64_t per = std::max<int64_t>(1, (int64_t(1) << 15) / spec.n);
  const int64_t tasks = (blocks + per - 1) / per;
  parallel_for(tasks, [&](int64_t t) {
    run_blocks<true>(dtype, x, t * per, std::min(blocks, (t + 1) * per), spec);
  });
}

void fwht_block_f32_ref(float* v, float* tmp, const FwhtSpec& spec) { block_ref(v, tmp, spec); }

void fwht_block_f32(float* v, float* tmp, const FwhtSpec& spec) { block_fast_f32(v, tmp, spec, norm_scale<float>(spec)); }

int64_t hadamard_k_largest(int64_t n, const int64_t* sizes, int64_t count) {
  int64_t best = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = sizes[i];
    if (k > 0 && n % k == 0 && is_pow2(n / k)) best = std::max(best, k);
  }
  return best;
}

int64_t hadamard_k_first(int64_t n, const int64_t* sizes, int64_t count) {
  if (is_pow2(n)) return 1;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = sizes[i];
    if (k > 0 && n % k == 0 && is_pow2(n / k)) return k;
  }
  return 0;
}

}  // namespace fastround::transform
