#include "fastround/tune/fp_qdq.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/fp_numerics.h"

namespace fastround::tune {

using fpq::clampf;
using fpq::floor_log2;
using fpq::pow2f;
using fpq::signf;

namespace {

// torch multiplies an fp32 tensor by a Python float scalar in fp32: ln 2 as log2's and pow's backward hold it.
constexpr float kLn2 = static_cast<float>(0.6931471805599453);

// Upstream's MXFP_FORMAT_CACHE rows of the two element formats, with quant_element's derived constants.
struct MxFormat {
  float emax, max_norm, min_p, mscale;  // mscale: 2^(mbits-2); min_p: the smallest private exponent
};

MxFormat mx_format(int bits) { return bits == 4 ? MxFormat{2.0f, 6.0f, 0.0f, 2.0f} : MxFormat{8.0f, 448.0f, -6.0f, 8.0f}; }

// A group's shared exponent from its (frozen) elements and range factor.
struct GroupExp {
  float amax = 0;     // max |x| (before the factor)
  int arg = 0;        // the first element holding it (torch.max's index)
  float mv = 0;       // amax * factor
  float e = 0;        // clamped shared exponent
  float s = 1;        // 2^e
  bool passes = true; // the exponent clamp did not bind: the gradient reaches the factor
};

GroupExp group_exp(const float* t, float factor, const MxFormat& F) {
  GroupExp g;
  g.amax = std::fabs(t[0]);
  for (int i = 1; i < kMxGroup; ++i) {
    const float a = std::fabs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = g.amax * factor;
  const float e0 = g.mv == 0.0f ? 1.0f : floor_log2(g.mv);
  const float d = e0 - F.emax;
  g.passes = d >= -127.0f && d <= 127.0f;
  g.e = clampf(d, -127.0f, 127.0f);
  g.s = pow2f(g.e);
  return g;
}

// One element through x / s + v, the range clamp and quant_element, with what its backward needs.
struct Elem {
  float x1, x2;  // before and after the range clamp
  float a0, p1;  // |x2| (1 for 0) and floor(log2(a0)) before the private-exponent floor
  float q2;      // 2^private exponent
  float y;       // x2 / q2 * mscale: the value rounded on the integer grid
  float z0, z;   // rounded / mscale, times q2 (before the final clamp)
  float out;     // element value (times s: the qdq)
};

inline Elem mx_elem(float t, float v, float s, const MxFormat& F) {
  Elem r;
  r.x1 = t / s + v;
  r.x2 = clampf(r.x1, -F.max_norm, F.max_norm);
  r.a0 = std::fabs(r.x2) + (r.x2 == 0.0f ? 1.0f : 0.0f);
  r.p1 = floor_log2(r.a0);
  r.q2 = pow2f(std::max(r.p1, F.min_p));
  r.y = (r.x2 / r.q2) * F.mscale;
  const float ay = std::fabs(r.y);
  const float h = ay - 0.5f;  // (|y| - 0.5) % 2 == 0: an even integer (never for negative h)
  const float mask = (h >= 0.0f && fpq::floor_nonneg(h) == h && (static_cast<int32_t>(h) & 1) == 0) ? 1.0f : 0.0f;
  const float rnd = signf(r.y) * (fpq::floor_nonneg(ay + 0.5f) - mask);
  r.z0 = rnd / F.mscale;
  r.z = r.z0 * r.q2;
  r.out = clampf(r.z, -F.max_norm, F.max_norm);
  return r;
}

inline bool inside(float x, float bound) { return x >= -bound && x <= bound; }

// The forward of one group: qdq values (fp32, before the dtype cast) and the group's exponent.
GroupExp group_forward(const float* t, const float* v, float factor, const MxFormat& F, float* q) {
  const GroupExp g = group_exp(t, factor, F);
  for (int i = 0; i < kMxGroup; ++i) q[i] = mx_elem(t[i], v ? v[i] : 0.0f, g.s, F).out * g.s;
  return g;
}

// The backward of one group: incoming gradient go[32] (fp32 of the qdq's dtype); gv / gx (fp32, before the cast)
// per element and the factor's gradient, each written when not null.
void group_backward(const float* t, const float* v, float factor, const MxFormat& F, const float* go, float* gv,
                    float* gmax, float* gx) {
  const GroupExp g = group_exp(t, factor, F);
  const float s = g.s, mn = F.max_norm;
  float gmul[kMxGroup], gdiv[kMxGroup], gt[kMxGroup];
  for (int i = 0; i < kMxGroup; ++i) {
    const Elem e = mx_elem(t[i], v ? v[i] : 0.0f, s, F);
    const float g_out = go[i] * s;
    const float g_z = inside(e.z, mn) ? g_out : 0.0f;
    const float g_z0 = g_z * e.q2;
    const float g_q2b = g_z * e.z0;  // the second 2^p (undoing the scaling)
    const float g_r = g_z0 / F.mscale;
    const float sy = signf(e.y);
    const float g_ay = g_r * sy;           // through floor_ste(|y| + 0.5)
    const float g_y = g_ay * sy + 0.0f;    // abs's gradient, plus sign()'s zeros
    const float g_y0 = g_y * F.mscale;
    const float g_x2d = g_y0 / e.q2;
    const float g_q2 = -g_y0 * ((e.x2 / e.q2) / e.q2);
    const float ql = e.q2 * kLn2;
    const float g_p = g_q2 * ql + g_q2b * ql;
    const float g_p1 = e.p1 >= F.min_p ? g_p : 0.0f;
    const float g_a0 = g_p1 / (e.a0 * kLn2);
    const float g_x2 = g_x2d + g_a0 * signf(e.x2);
    const float g_x1 = inside(e.x1, mn) ? g_x2 : 0.0f;
    if (gv) gv[i] = g_x1;
    gt[i] = g_x1 / s;
    gdiv[i] = -g_x1 * ((t[i] / s) / s);
    gmul[i] = go[i] * e.out;
  }
  if (!gmax && !gx) return;
  const float g_s = fpq::torch_sum_lanes8<32>(gmul) + fpq::torch_sum_lanes8<32>(gdiv);
  const float g_e = g.passes ? g_s * (s * kLn2) : 0.0f;
  const float g_log = g.mv == 0.0f ? 0.0f : g_e;
  const float g_mv = g_log / (g.mv * kLn2);  // 0 / 0 for an all-zero group, as torch's where + log2
  if (gmax) *gmax = g_mv * g.amax;
  if (gx) {
    const float g_amax = g_mv * factor;
    for (int i = 0; i < kMxGroup; ++i) gx[i] = gt[i] + (i == g.arg ? g_amax : 0.0f) * signf(t[i]);
  }
}

// E2M1 / E4M3 code of a stored qdq value w (in the x dtype) over its group's scale, as the packers re-derive it.
inline uint8_t mx_code(int bits, float w, float s) {
  const float c = w / s;
  return bits == 4 ? fpq::e2m1_code(c) : fpq::e4m3_code(c);
}

// ---- NVFP4_E5M3 (upstream's nvfp4_v2 through ref_fp4_quant, global scale 1) ----

struct NvGroup {
  float amax = 0;  // max |x| (x's dtype holds it exactly)
  int arg = 0;
  float mv = 0;    // amax * factor
  float sc0 = 0;   // 1 * (mv * (1/6)), before the clip
  float d = 0;     // the UE5M3 scale as the qdq uses it ((cast - s) + s of the clipped value)
  uint8_t byte = 0;
};

NvGroup nv_group_scale(const float* t, float factor) {
  NvGroup g;
  g.amax = std::fabs(t[0]);
  for (int i = 1; i < kNvGroup; ++i) {
    const float a = std::fabs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = g.amax * factor;
  g.sc0 = 1.0f * (g.mv * fpq::kOneSixth);
  const float sc1 = clampf(g.sc0, 0.0f, fpq::kUe5m3Max);
  g.byte = ue5m3_encode(sc1);
  g.d = (ue5m3_decode(g.byte) - sc1) + sc1;  // cast_to_ue5m3_ste's value
  return g;
}

// One element: x / d (0 when d is 0) + v, clamped to [-6, 6], cast_to_fp4 (its value is fp_numerics.h's).
struct NvElem {
  float sx, cx, r, f;  // x / d + v, clamped, cast_to_fp4 before its clamp and sign, the element value
};

inline NvElem nv_elem(float t, float v, float d) {
  NvElem e;
  e.sx = (d == 0.0f ? 0.0f : t / d) + v;
  e.cx = clampf(e.sx, -6.0f, 6.0f);
  e.f = fpq::cast_to_fp4(e.cx);
  e.r = std::fabs(e.f);
  return e;
}

NvGroup nv_group_forward(const float* t, const float* v, float factor, float* q) {
  const NvGroup g = nv_group_scale(t, factor);
  for (int i = 0; i < kNvGroup; ++i) q[i] = nv_elem(t[i], v ? v[i] : 0.0f, g.d).f * g.d;
  return g;
}

// As group_backward; `dt` is x's dtype: upstream takes the group maximum before casting to fp32, so the
// maximum's gradient is rounded to it and added to the rest of x's gradient in it.
void nv_group_backward(const float* t, const float* v, float factor, DType dt, const float* go, float* gv,
                       float* gmax, float* gx) {
  const NvGroup g = nv_group_scale(t, factor);
  const float d = g.d;
  float gmul[kNvGroup], gdiv[kNvGroup], gt[kNvGroup];
  for (int i = 0; i < kNvGroup; ++i) {
    const NvElem e = nv_elem(t[i], v ? v[i] : 0.0f, d);
    const float sgn = signf(e.cx);
    const float a = std::fabs(e.cx);
    const float g_f = go[i] * d;
    const float g_r2 = g_f * sgn;
    const float g_r = inside(e.r, 6.0f) ? g_r2 : 0.0f;  // the clamp after the bands
    // Exactly one band's mask is 1: its step's gradient, through round_ste's identity (x2 / 2, / 2 x 2).
    float g_a;
    if (a < 2.0f) g_a = (g_r / 2.0f) * 2.0f;
    else if (a < 4.0f) g_a = g_r;
    else g_a = (g_r * 2.0f) / 2.0f;
    const float g_cx = g_a * sgn + 0.0f;
    const float g_sx = inside(e.sx, 6.0f) ? g_cx : 0.0f;
    if (gv) gv[i] = g_sx;
    const float g_div = d == 0.0f ? 0.0f : g_sx;
    gt[i] = g_div / d;
    gdiv[i] = -g_div * ((t[i] / d) / d);
    gmul[i] = go[i] * e.f;
  }
  if (!gmax && !gx) return;
  const float g_d = fpq::torch_sum_lanes8<16>(gmul) + fpq::torch_sum_lanes8<16>(gdiv);
  const float g_sc0 = (g.sc0 >= 0.0f && g.sc0 <= fpq::kUe5m3Max) ? g_d * 1.0f : 0.0f;
  const float g_mv = (g_sc0 * 1.0f) * fpq::kOneSixth;
  if (gmax) *gmax = g_mv * g.amax;
  if (gx) {
    const float g_amax = round_to_dtype(dt, g_mv * factor);
    for (int i = 0; i < kNvGroup; ++i)
      gx[i] = round_to_dtype(dt, round_to_dtype(dt, gt[i]) + (i == g.arg ? g_amax : 0.0f) * signf(t[i]));
  }
}

// ---- NVFP4 (upstream's ref_nvfp4_quant: E4M3 group scales under a per-tensor global scale gs) ----

inline float reciprocal_or_zero(float a) { return a == 0.0f ? 0.0f : 1.0f / a; }  // get_reciprocal

struct Nv4Group {
  float amax = 0;  // max |x| (x's dtype holds it exactly)
  int arg = 0;
  float mv = 0;    // amax * factor
  float sc0 = 0;   // gs * (mv * (1/6)), before the clamp
  float s = 0;     // the E4M3 scale as the qdq uses it ((cast - s) + s of the clamped value)
  float dq = 0;    // s * (1 / gs)
  float os = 0;    // 1 / dq (0 for 0): what x is multiplied by
  float r = 0;     // 1 / os (0 for 0): what the element values are multiplied by
  uint8_t byte = 0;
};

Nv4Group nv4_group_scale(const float* t, float factor, float gs) {
  Nv4Group g;
  g.amax = std::fabs(t[0]);
  for (int i = 1; i < kNvGroup; ++i) {
    const float a = std::fabs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = g.amax * factor;
  g.sc0 = gs * (g.mv * fpq::kOneSixth);
  const float sc1 = clampf(g.sc0, -448.0f, 448.0f);
  const float cast = fp8_e4m3_to_float(float_to_fp8_e4m3(sc1));
  g.s = (cast - sc1) + sc1;  // float8_e4m3fn_ste's value
  g.byte = float_to_fp8_e4m3(g.s);
  g.dq = g.s * reciprocal_or_zero(gs);
  g.os = reciprocal_or_zero(g.dq);
  g.r = reciprocal_or_zero(g.os);
  return g;
}

// One element: x * os + v, clamped to [-6, 6], cast_to_fp4.
inline NvElem nv4_elem(float t, float v, float os) {
  NvElem e;
  e.sx = t * os + v;
  e.cx = clampf(e.sx, -6.0f, 6.0f);
  e.f = fpq::cast_to_fp4(e.cx);
  e.r = std::fabs(e.f);
  return e;
}

Nv4Group nv4_group_forward(const float* t, const float* v, float factor, float gs, float* q) {
  const Nv4Group g = nv4_group_scale(t, factor, gs);
  for (int i = 0; i < kNvGroup; ++i) q[i] = nv4_elem(t[i], v ? v[i] : 0.0f, g.os).f * g.r;
  return g;
}

// cast_to_fp4's gradient at its input (round_ste is an identity inside each band, the sign() factor passes
// none, the final clamp passes inside [-6, 6]): g_f is the gradient reaching its output.
inline float fp4_cast_backward(const NvElem& e, float g_f) {
  const float sgn = signf(e.cx);
  const float a = std::fabs(e.cx);
  const float g_r2 = g_f * sgn;
  const float g_r = inside(e.r, 6.0f) ? g_r2 : 0.0f;
  float g_a;
  if (a < 2.0f) g_a = (g_r / 2.0f) * 2.0f;
  else if (a < 4.0f) g_a = g_r;
  else g_a = (g_r * 2.0f) / 2.0f;
  return g_a * sgn + 0.0f;
}

// The gradient reaching a where(a == 0, 0, 1.0 / a) from g at its output: torch's reciprocal backward
// -g * (1/a)^2, with g masked to 0 where a is 0 (so -0 * inf: NaN there).
inline float reciprocal_backward(float a, float g) {
  const float masked = a == 0.0f ? 0.0f : g * 1.0f;
  const float rr = 1.0f / a;
  return -masked * (rr * rr);
}

// As nv_group_backward, through ref_nvfp4_quant's scale chain.
void nv4_group_backward(const float* t, const float* v, float factor, float gs, DType dt, const float* go, float* gv,
                        float* gmax, float* gx) {
  const Nv4Group g = nv4_group_scale(t, factor, gs);
  float gmul[kNvGroup], gos[kNvGroup], gt[kNvGroup];
  for (int i = 0; i < kNvGroup; ++i) {
    const NvElem e = nv4_elem(t[i], v ? v[i] : 0.0f, g.os);
    const float g_sx = inside(e.sx, 6.0f) ? fp4_cast_backward(e, go[i] * g.r) : 0.0f;
    if (gv) gv[i] = g_sx;
    gt[i] = g_sx * g.os;
    gos[i] = g_sx * t[i];
    gmul[i] = go[i] * e.f;
  }
  if (!gmax && !gx) return;
  const float g_r = fpq::torch_sum_lanes8<16>(gmul);
  const float g_os = fpq::torch_sum_lanes8<16>(gos) + reciprocal_backward(g.os, g_r);
  const float g_dq = reciprocal_backward(g.dq, g_os);
  const float g_s = g_dq * reciprocal_or_zero(gs);
  const float g_sc0 = inside(g.sc0, 448.0f) ? g_s : 0.0f;
  const float g_mv = (g_sc0 * gs) * fpq::kOneSixth;
  if (gmax) *gmax = g_mv * g.amax;
  if (gx) {
    const float g_amax = round_to_dtype(dt, g_mv * factor);
    for (int i = 0; i < kNvGroup; ++i)
      gx[i] = round_to_dtype(dt, round_to_dtype(dt, gt[i]) + (i == g.arg ? g_amax : 0.0f) * signf(t[i]));
  }
}

// The packer's code of a stored qdq value w: w * (1 / (s * (1 / gs))), clamped to [-6, 6], cast_to_fp4.
inline uint8_t nv4_code(float w, float os) {
  return fpq::e2m1_code(fpq::cast_to_fp4(clampf(w * os, -6.0f, 6.0f)));
}

// The group functions of a format, behind one signature: qdq values and (exponent or scale, scale byte).
float group_forward_any(const FpQdqParams& p, const float* t, const float* v, float factor, float* q,
                        uint8_t* byte) {
  if (p.nv_fp4) {
    const Nv4Group g = nv4_group_forward(t, v, factor, p.global_scale, q);
    *byte = g.byte;
    return g.s;
  }
  if (p.nv_e5m3) {
    const NvGroup g = nv_group_forward(t, v, factor, q);
    *byte = g.byte;
    return g.d;
  }
  const GroupExp g = group_forward(t, v, factor, mx_format(p.bits), q);
  *byte = static_cast<uint8_t>(g.e + 127.0f);
  return g.e;
}

void group_backward_any(const FpQdqParams& p, DType dt, const float* t, const float* v, float factor,
                        const float* go, float* gv, float* gmax, float* gx) {
  if (p.nv_fp4)
    nv4_group_backward(t, v, factor, p.global_scale, dt, go, gv, gmax, gx);
  else if (p.nv_e5m3)
    nv_group_backward(t, v, factor, dt, go, gv, gmax, gx);
  else
    group_backward(t, v, factor, mx_format(p.bits), go, gv, gmax, gx);
}

// The code of a stored qdq value w over its group's scale (MX: e is the exponent; NV: the decoded scale), as the
// packers re-derive it.
inline uint8_t code_any(const FpQdqParams& p, float w, float e) {
  if (p.nv_fp4) return nv4_code(w, reciprocal_or_zero(e * reciprocal_or_zero(p.global_scale)));
  if (p.nv_e5m3) return fpq::nv_code(w, e);
  return mx_code(p.bits, w, pow2f(e));
}

float factor_of(const float* f, int64_t gi) { return f ? f[gi] : 1.0f; }

}  // namespace

void fp_qdq_check(const FpQdqView& v, const FpQdqParams& p, const char* site) {
  require_float_source(v.dtype, site);
  if (p.nv_e5m3 && p.nv_fp4)
    throw OptionError(std::string("[") + site + "] NVFP4_E5M3 and NVFP4 are exclusive");
  if (p.nv_fp4 && !(std::isfinite(p.global_scale) && p.global_scale >= 0.0f))
    throw OptionError(std::string("[") + site + "] global_scale must be finite and >= 0, got " +
                      std::to_string(p.global_scale));
  if ((p.nv_e5m3 || p.nv_fp4) ? p.bits != 4 : (p.bits != 4 && p.bits != 8))
    throw OptionError(std::string("[") + site + "] bits must be " + ((p.nv_e5m3 || p.nv_fp4) ? "4 (NVFP4)" : "4 or 8 (MXFP)") +
                      ", got " + std::to_string(p.bits));
  if (v.rows < 0 || v.cols <= 0 || v.cols % p.group() != 0)
    throw OptionError(std::string("[") + site + "] columns " + std::to_string(v.cols) +
                      " are not a positive multiple of the group size " + std::to_string(p.group()));
  if (!v.x && v.rows > 0) throw OptionError(std::string("[") + site + "] the input tensor is required");
}

// ---- reference: one group after another, elements read one at a time ----

void fp_qdq_forward_ref(const FpQdqView& v, const FpQdqParams& p, void* qdq, float* exponent, uint8_t* codes,
                        uint8_t* scales) {
  fp_qdq_check(v, p, "fp_qdq_forward_ref");
  const int64_t G = p.group(), ng = v.rows * (v.cols / G);
  for (int64_t gi = 0; gi < ng; ++gi) {
    float t[kMxGroup], q[kMxGroup];
    for (int64_t i = 0; i < G; ++i) t[i] = element_as_float(v.dtype, v.x, gi * G + i);
    uint8_t byte = 0;
    const float e = group_forward_any(p, t, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi), q, &byte);
    exponent[gi] = e;
    if (scales) scales[gi] = byte;
    for (int64_t i = 0; i < G; ++i) {
      store_from_float(v.dtype, &q[i], 1, qdq, gi * G + i);
      if (codes) codes[gi * G + i] = code_any(p, round_to_dtype(v.dtype, q[i]), e);
    }
  }
}

void fp_qdq_backward_ref(const FpQdqView& v, const FpQdqParams& p, const void* grad, float* grad_v, float* grad_max,
                         void* grad_x) {
  fp_qdq_check(v, p, "fp_qdq_backward_ref");
  const int64_t G = p.group(), ng = v.rows * (v.cols / G);
  for (int64_t gi = 0; gi < ng; ++gi) {
    float t[kMxGroup], go[kMxGroup], gx[kMxGroup];
    for (int64_t i = 0; i < G; ++i) {
      t[i] = element_as_float(v.dtype, v.x, gi * G + i);
      go[i] = element_as_float(v.dtype, grad, gi * G + i);
    }
    group_backward_any(p, v.dtype, t, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi), go,
                       grad_v ? grad_v + gi * G : nullptr, grad_max ? grad_max + gi : nullptr, grad_x ? gx : nullptr);
    if (grad_x)
      for (int64_t i = 0; i < G; ++i) store_from_float(v.dtype, &gx[i], 1, grad_x, gi * G + i);
  }
}

// ---- fast: rows in parallel, each row converted once ----

void fp_qdq_forward(const FpQdqView& v, const FpQdqParams& p, void* qdq, float* exponent, uint8_t* codes,
                    uint8_t* scales) {
  fp_qdq_check(v, p, "fp_qdq_forward");
  const int64_t G = p.group(), gpr = v.cols / G;
  parallel_for(v.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(v.cols)), out(static_cast<size_t>(v.cols));
    load_as_float(v.dtype, v.x, r * v.cols, v.cols, row.data());
    for (int64_t g = 0; g < gpr; ++g) {
      const int64_t gi = r * gpr + g;
      uint8_t byte = 0;
      exponent[gi] = group_forward_any(p, row.data() + g * G, v.v ? v.v + gi * G : nullptr,
                                       factor_of(v.max_scale, gi), out.data() + g * G, &byte);
      if (scales) scales[gi] = byte;
    }
    store_from_float(v.dtype, out.data(), v.cols, qdq, r * v.cols);
    if (codes) {
      for (int64_t c = 0; c < v.cols; ++c)
        codes[r * v.cols + c] = code_any(p, round_to_dtype(v.dtype, out[c]), exponent[r * gpr + c / G]);
    }
  });
}

void fp_qdq_backward(const FpQdqView& v, const FpQdqParams& p, const void* grad, float* grad_v, float* grad_max,
                     void* grad_x) {
  fp_qdq_check(v, p, "fp_qdq_backward");
  const int64_t G = p.group(), gpr = v.cols / G;
  parallel_for(v.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(v.cols)), go(static_cast<size_t>(v.cols));
    std::vector<float> gx(grad_x ? static_cast<size_t>(v.cols) : 0);
    load_as_float(v.dtype, v.x, r * v.cols, v.cols, row.data());
    load_as_float(v.dtype, grad, r * v.cols, v.cols, go.data());
    for (int64_t g = 0; g < gpr; ++g) {
      const int64_t gi = r * gpr + g;
      group_backward_any(p, v.dtype, row.data() + g * G, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi),
                         go.data() + g * G, grad_v ? grad_v + gi * G : nullptr, grad_max ? grad_max + gi : nullptr,
                         grad_x ? gx.data() + g * G : nullptr);
    }
    if (grad_x) store_from_float(v.dtype, gx.data(), v.cols, grad_x, r * v.cols);
  });
}

}  // namespace fastround::tune
