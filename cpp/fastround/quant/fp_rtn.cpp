#include "fastround/quant/fp_rtn.h"

#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"
#include "fastround/pack/pack_fp.h"
#include "fastround/quant/fp_numerics.h"
#include "fastround/quant/simd.h"

namespace fastround {

using namespace fpq;

namespace {

// Quantizes one row's groups into codes (one byte per element) and scale bytes.
template <int BITS>
void mx_row(const float* x, int64_t cols, DType src, bool opt_rtn, uint8_t* codes, uint8_t* scale) {
  for (int64_t g = 0; g < cols / 32; ++g) mx_group<BITS>(x + g * 32, src, opt_rtn, codes + g * 32, scale + g);
}

template <int BITS>
void quantize_mxfp_rows(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale) {
  const simd::Kernels* K = simd::active_kernels();
  parallel_for(L.rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(L.cols));
    std::vector<uint8_t> codes(BITS == 4 ? static_cast<size_t>(L.cols) : 0);
    uint8_t* out = BITS == 4 ? codes.data() : weight + r * L.cols;
    if (K != nullptr) {
      K->load_as_float(src, w, r * L.cols, L.cols, x.data());
      K->mx_row(BITS, x.data(), L.cols, src, opt_rtn, out, scale + r * (L.cols / 32));
    } else {
      load_as_float(src, w, r * L.cols, L.cols, x.data());
      mx_row<BITS>(x.data(), L.cols, src, opt_rtn, out, scale + r * (L.cols / 32));
    }
    if (BITS == 4) pack_e2m1_ref(codes.data(), L.cols, weight + r * (L.cols / 2));
  });
}

// ---- NVFP4_E5M3 ----

void nv_load_row(const simd::Kernels* K, DType src, const void* w, int64_t r, int64_t cols, float* x) {
  (K != nullptr ? K->load_as_float : load_as_float)(src, w, r * cols, cols, x);
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

void quantize_mxfp_ref(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, uint8_t* weight, uint8_t* scale) {
  quantize_mxfp_weighted_ref(src, w, L, opt_rtn, nullptr, weight, scale);
}

// Reference: whole-tensor passes in upstream's order (group maxima, each candidate over all groups, the
// selection, then encoding and packing), one element at a time.
void quantize_mxfp_weighted_ref(DType src, const void* w, const MxfpLayout& L, bool opt_rtn, const float* qw,
                                uint8_t* weight, uint8_t* scale) {
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
      const float* wg = qw != nullptr ? qw + g * 32 : nullptr;
      loss[g] = L.bits == 4 ? mx_qdq_group<4>(&x[g * 32], e[g], &q[g * 32], wg)
                            : mx_qdq_group<8>(&x[g * 32], e[g], &q[g * 32], wg);
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
    pack_e2m1_ref(codes.data(), n, weight);
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
  pack_e2m1_ref(codes.data(), n, packed);
}

void quantize_nvfp4_e5m3(DType src, const void* w, int64_t rows, int64_t cols, bool opt_rtn, uint8_t* packed,
                         uint8_t* scale) {
  require_float_source(src, "quantize_nvfp4_e5m3");
  check_nvfp4_shape(cols);
  const simd::Kernels* K = simd::active_kernels();
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(cols));
    nv_load_row(K, src, w, r, cols, x.data());
    uint8_t* out = packed + r * (cols / 2);
    for (int64_t g = 0; g < cols / 16; ++g) {
      if (K != nullptr) {
        K->nv_group(&x[g * 16], opt_rtn, scale + r * (cols / 16) + g, out + g * 8);
        continue;
      }
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
  const simd::Kernels* K = simd::active_kernels();
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(cols)), q(static_cast<size_t>(cols));
    nv_load_row(K, src, w, r, cols, x.data());
    for (int64_t g = 0; g < cols / 16; ++g) {
      if (K != nullptr) {
        K->nv_fake_group(&x[g * 16], opt_rtn, &q[g * 16]);
        continue;
      }
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
