#include "fastround/transform/hadamard_mxfp4_act.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"

namespace fastround::transform {

namespace {

// The rows are cut into units of lcm(n, 32) elements: whole rotation blocks and whole quantization groups.
int64_t unit_length(const FwhtSpec& rot) { return std::lcm(rot.n, kMxfp4ActGroup); }

FwhtSpec unnormalized(const FwhtSpec& rot) {
  FwhtSpec s = rot;
  s.normalize = false;  // c is applied here, rounded to the input dtype
  return s;
}

// ---- reference: rotate, scale by c, then one group at a time as the definition spells it ----

void unit_ref(float* v, float* tmp, int64_t len, const FwhtSpec& sums, bool normalize, float c) {
  for (int64_t b = 0; b < len; b += sums.n) fwht_block_f32_ref(v + b, tmp, sums);
  if (normalize)
    for (int64_t i = 0; i < len; ++i) v[i] = v[i] * c;
  for (int64_t g = 0; g < len; g += kMxfp4ActGroup) {
    float amax = 0.0f;
    for (int64_t i = 0; i < kMxfp4ActGroup; ++i) amax = std::fabs(v[g + i]) > amax ? std::fabs(v[g + i]) : amax;
    const float s = mxfp4_act_scale(amax);
    for (int64_t i = 0; i < kMxfp4ActGroup; ++i) v[g + i] = mxfp4_act_qdq(v[g + i], s);
  }
}

// ---- fast path: the same IEEE operations; the E2M1 magnitude as a sum of threshold steps (exact in fp32) ----

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FR_CLONES
#endif

FR_CLONES void groups_fast(float* __restrict v, int64_t len, bool normalize, float c) {
  if (normalize) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) v[i] = v[i] * c;
  }
  for (int64_t g = 0; g < len; g += kMxfp4ActGroup) {
    float* __restrict p = v + g;
    float amax = 0.0f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < kMxfp4ActGroup; ++i) {
      const float a = std::fabs(p[i]);
      amax = a > amax ? a : amax;  // NaN never wins, as in the reference
    }
    const float s = mxfp4_act_scale(amax);
#pragma omp simd
    for (int64_t i = 0; i < kMxfp4ActGroup; ++i) {
      const float r = p[i] / s;
      const float a = std::fabs(r);
      const float q = (a > 0.25f ? 0.5f : 0.0f) + (a > 0.75f ? 0.5f : 0.0f) + (a > 1.25f ? 0.5f : 0.0f) +
                      (a > 1.75f ? 0.5f : 0.0f) + (a > 2.5f ? 1.0f : 0.0f) + (a > 3.5f ? 1.0f : 0.0f) +
                      (a > 5.0f ? 2.0f : 0.0f);
      p[i] = (r > 0.0f ? q : -q) * s;
    }
  }
}

template <bool Fast>
void run_units(DType dt, const void* x, void* out, int64_t u0, int64_t u1, int64_t len, const FwhtSpec& sums,
               bool normalize, float c) {
  std::vector<float> buf(static_cast<size_t>(len)), tmp(static_cast<size_t>(sums.k > 1 ? sums.n : 0));
  for (int64_t u = u0; u < u1; ++u) {
    load_as_float(dt, x, u * len, len, buf.data());
    if (Fast) {
      for (int64_t b = 0; b < len; b += sums.n) fwht_block_f32(buf.data() + b, tmp.data(), sums);
      groups_fast(buf.data(), len, normalize, c);
    } else {
      unit_ref(buf.data(), tmp.data(), len, sums, normalize, c);
    }
    store_from_float(dt, buf.data(), len, out, u * len);
  }
}

}  // namespace

float hadamard_norm_in(DType dtype, int64_t n) {
  const float c = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  switch (dtype) {
    case DType::BF16: return bf16_to_float(float_to_bf16(c));
    case DType::F16: return fp16_to_float(float_to_fp16(c));
    default: return c;
  }
}

void hadamard_mxfp4_act_check(DType dtype, const void* x, const void* out, int64_t rows, int64_t cols,
                              const FwhtSpec& rot, const char* site) {
  const std::string at = std::string("[") + site + "] ";
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw OptionError(at + "x: dtype must be F32, F16 or BF16, got " + std::string(dtype_name(dtype)));
  fwht_check(dtype, x, rows, cols, rot, site);
  if (cols % kMxfp4ActGroup != 0)
    throw OptionError(at + "x: the last dimension " + std::to_string(cols) + " is not a multiple of the MXFP4 " +
                      "activation group 32");
  if (rows * cols > 0 && !out) throw OptionError(at + "out: null data");
}

void hadamard_mxfp4_act_rows_ref(DType dtype, const void* x, void* out, int64_t rows, int64_t cols,
                                 const FwhtSpec& rot) {
  hadamard_mxfp4_act_check(dtype, x, out, rows, cols, rot, "hadamard_mxfp4_act_rows_ref");
  if (rows * cols == 0) return;
  const int64_t len = unit_length(rot);
  run_units<false>(dtype, x, out, 0, rows * cols / len, len, unnormalized(rot), rot.normalize,
                   hadamard_norm_in(dtype, rot.n));
}

void hadamard_mxfp4_act_rows(DType dtype, const void* x, void* out, int64_t rows, int64_t cols, const FwhtSpec& rot) {
  hadamard_mxfp4_act_check(dtype, x, out, rows, cols, rot, "hadamard_mxfp4_act_rows");
  if (rows * cols == 0) return;
  const int64_t len = unit_length(rot);
  const int64_t units = rows * cols / len;
  // ~32K elements per task, static chunks: the split never depends on the thread count (units are independent)
  const int64_t per = std::max<int64_t>(1, (int64_t(1) << 15) / len);
  const int64_t tasks = (units + per - 1) / per;
  const FwhtSpec sums = unnormalized(rot);
  const float c = hadamard_norm_in(dtype, rot.n);
  parallel_for(tasks, [&](int64_t t) {
    run_units<true>(dtype, x, out, t * per, std::min(units, (t + 1) * per), len, sums, rot.normalize, c);
  });
}

}  // namespace fastround::transform
