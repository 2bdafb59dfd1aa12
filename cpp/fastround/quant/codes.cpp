#include "fastround/quant/codes.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/quant/int_rtn.h"
#include "fastround/quant/simd.h"

namespace fastround {

namespace {

// x / s as the tensor op rounds it: an F16 weight over its fp16 scale stays fp16 (torch computes the fp32
// quotient and rounds it); BF16 over fp16 promotes to fp32, F32 is fp32.
inline float quotient(DType src, float x, float s) {
  const float v = x / s;
  return src == DType::F16 ? round_to_dtype(DType::F16, v) : v;
}

// Asym scale and zero point: (max - min) and its division by maxq are tensor ops in the weight's dtype, then
// the fp16 cast and the 1e-5 floor; the zero point divides -min by that fp16 scale (quotient's dtype rule).
IntGroupQuant asym_quant(DType src, float mn, float mx, int bits) {
  const float range = round_to_dtype(src, mx - mn);
  const float s = round_to_dtype(src, range / static_cast<float>((1 << bits) - 1));
  const uint16_t floor16 = float_to_fp16(1e-5f);
  uint16_t h = float_to_fp16(s);
  if (fp16_is_negative(h) || fp16_to_float(h) < fp16_to_float(floor16)) h = floor16;
  IntGroupQuant q{};
  q.scale_fp16 = h;
  q.scale = fp16_to_float(h);
  q.zero = static_cast<int32_t>(std::nearbyint(quotient(src, -mn, q.scale)));
  return q;
}

// The sym scale is (signed max / 2^(bits-1)): a power-of-two division, exact in every dtype before the fp16
// cast, so model-free's int_group_quant already gives it.
IntGroupQuant group_quant(DType src, float mn, float mx, int bits, bool sym) {
  return sym ? int_group_quant(mn, mx, bits, true) : asym_quant(src, mn, mx, bits);
}

// codes = clamp(rne(quotient) + zero, 0, maxq) over n values; the sym clamp to [-Q, Q-1] before adding Q is the
// same integer range shifted. rne by the 1.5*2^23 trick (the pre-clamp keeps it exact and the result in range).
template <bool F16>
void encode_run(const float* __restrict x, int64_t n, float scale, float zero, float maxq, uint8_t* __restrict out) {
  constexpr float kMagic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] / scale;
    if (F16) v = round_to_dtype(DType::F16, v);
    v = v < -4194304.0f ? -4194304.0f : (v > 4194304.0f ? 4194304.0f : v);
    v = ((v + kMagic) - kMagic) + zero;
    v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
    out[i] = static_cast<uint8_t>(v);
  }
}

float scale_as_float(DType dt, const void* scales, int64_t i) {
  switch (dt) {
    case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(scales)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(scales)[i]);
    case DType::F32: return static_cast<const float*>(scales)[i];
    default: throw OptionError("[dequantize_int_codes] scales dtype must be F16, BF16 or F32, got " +
                               std::string(dtype_name(dt)));
  }
}

void require_out_dtype(DType out, const char* site) {
  if (!dtype_is_float_weight(out))
    throw OptionError(std::string("[") + site + "] output dtype must be F32, F16 or BF16, got " +
                      std::string(dtype_name(out)));
}

}  // namespace

IntGrouping int_grouping(int64_t rows, int64_t cols, int64_t group_size, const char* site) {
  if (rows <= 0 || cols <= 0) throw OptionError(std::string("[int] ") + site + ": cannot quantize an empty weight");
  if (group_size != -1 && group_size <= 0)
    throw OptionError(std::string("[int] ") + site + ": group_size must be -1 or positive, got " +
                      std::to_string(group_size));
  IntGrouping g;
  g.rows = rows;
  g.cols = cols;
  g.group_size = group_size;
  if (group_size == -1 || cols < group_size) {
    g.group = cols;
    g.groups = 1;
  } else {
    g.group = group_size;
    g.groups = (cols + group_size - 1) / group_size;
  }
  return g;
}

void int_rtn_codes_ref(DType src, const void* w, const IntGrouping& g, int bits, bool sym, uint8_t* codes,
                       uint16_t* scales, int32_t* zeros) {
  require_float_source(src, "int_rtn_codes");
  const int nmax = 1 << (bits - 1), maxq = (1 << bits) - 1;
  for (int64_t r = 0; r < g.rows; ++r)
    for (int64_t k = 0; k < g.groups; ++k) {
      const int64_t c0 = k * g.group, c1 = std::min(c0 + g.group, g.cols);
      // Padding zeros never move a range already clamped through 0.
      float mn = 0.0f, mx = 0.0f;
      std::vector<float> x(static_cast<size_t>(c1 - c0));
      load_as_float(src, w, r * g.cols + c0, c1 - c0, x.data());
      for (float v : x) {
        mn = std::min(mn, v);
        mx = std::max(mx, v);
      }
      const IntGroupQuant q = group_quant(src, mn, mx, bits, sym);
      scales[r * g.groups + k] = q.scale_fp16;
      zeros[r * g.groups + k] = q.zero;
      for (int64_t c = c0; c < c1; ++c) {
        const float t = std::nearbyint(quotient(src, x[c - c0], q.scale));
        const float code = sym ? std::clamp(t, static_cast<float>(-nmax), static_cast<float>(nmax - 1)) + nmax
                               : std::clamp(t + static_cast<float>(q.zero), 0.0f, static_cast<float>(maxq));
        codes[r * g.cols + c] = static_cast<uint8_t>(code);
      }
    }
}

void int_rtn_codes(DType src, const void* w, const IntGrouping& g, int bits, bool sym, uint8_t* codes,
                   uint16_t* scales, int32_t* zeros) {
  require_float_source(src, "int_rtn_codes");
  if (bits < 1 || bits > 8) throw OptionError("[int_rtn_codes] bits must be 1..8, got " + std::to_string(bits));
  const simd::Kernels* K = simd::active_kernels();
  const float maxq = static_cast<float>((1 << bits) - 1);
  parallel_for(g.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(g.cols));
    if (K != nullptr)
      K->load_as_float(src, w, r * g.cols, g.cols, row.data());
    else
      load_as_float(src, w, r * g.cols, g.cols, row.data());
    for (int64_t k = 0; k < g.groups; ++k) {
      const int64_t c0 = k * g.group, n = std::min(g.group, g.cols - c0);
      const float* x = row.data() + c0;
      float mn = 0.0f, mx = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
      }
      const IntGroupQuant q = group_quant(src, mn, mx, bits, sym);
      scales[r * g.groups + k] = q.scale_fp16;
      zeros[r * g.groups + k] = q.zero;
      uint8_t* out = codes + r * g.cols + c0;
      if (src == DType::F16)
        encode_run<true>(x, n, q.scale, static_cast<float>(q.zero), maxq, out);
      else
        encode_run<false>(x, n, q.scale, static_cast<float>(q.zero), maxq, out);
    }
  });
}

void dequantize_int_codes(const uint8_t* codes, DType scale_dtype, const void* scales, const int32_t* zeros,
                          const IntGrouping& g, DType out, void* dst, bool sym, DType source_dtype, const void* source) {
  require_out_dtype(out, "dequantize_int_codes");
  scale_as_float(scale_dtype, scales, 0);  // dtype check before the parallel loop
  if (source != nullptr) require_float_source(source_dtype, "dequantize_int_codes");
  const bool signed_zeros = sym && source != nullptr;
  parallel_for(g.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(g.cols)), src(signed_zeros ? static_cast<size_t>(g.cols) : 0);
    if (signed_zeros) load_as_float(source_dtype, source, r * g.cols, g.cols, src.data());
    for (int64_t k = 0; k < g.groups; ++k) {
      const float s = scale_as_float(scale_dtype, scales, r * g.groups + k);
      const int32_t z = zeros[r * g.groups + k];
      const int64_t c0 = k * g.group, c1 = std::min(c0 + g.group, g.cols);
      for (int64_t c = c0; c < c1; ++c) {
        const int32_t q = static_cast<int32_t>(codes[r * g.cols + c]) - z;
        row[c] = (q == 0 && signed_zeros) ? std::copysign(0.0f, src[c]) : static_cast<float>(q) * s;
      }
    }
    store_from_float(out, row.data(), g.cols, dst, r * g.cols);
  });
}

void dequantize_mxfp_codes(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, int bits, DType out,
                           void* dst) {
  require_out_dtype(out, "dequantize_mxfp_codes");
  mxfp_layout(rows, cols, bits, "codes");
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(cols));
    const uint8_t* c = codes + r * cols;
    for (int64_t i = 0; i < cols; ++i) {
      const float v = bits == 4 ? e2m1_to_float(c[i]) : fp8_e4m3_to_float(c[i]);
      row[i] = v * e8m0_to_float(scales[r * (cols / 32) + i / 32]);
    }
    store_from_float(out, row.data(), cols, dst, r * cols);
  });
}

void dequantize_nvfp4_codes(const uint8_t* codes, const uint8_t* scales, int64_t rows, int64_t cols, DType out,
                            void* dst) {
  require_out_dtype(out, "dequantize_nvfp4_codes");
  if (rows <= 0 || cols <= 0 || cols % 16 != 0)
    throw OptionError("[nvfp4_e5m3] codes: in_features " + std::to_string(cols) + " is not a multiple of 16");
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(cols));
    const uint8_t* c = codes + r * cols;
    for (int64_t i = 0; i < cols; ++i) {
      // upstream zeroes a group whose scale is 0 before the cast (the code holds the kernel's +-6 there)
      const float d = ue5m3_decode(scales[r * (cols / 16) + i / 16]);
      row[i] = d == 0.0f ? 0.0f : e2m1_to_float(c[i]) * d;
    }
    store_from_float(out, row.data(), cols, dst, r * cols);
  });
}

}  // namespace fastround
