#include "fastround/tune/fp_qdq.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
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

inline bool inside(float x, float bound) { return x >= -bound && x <= bound; }

inline float reciprocal_or_zero(float a) { return a == 0.0f ? 0.0f : 1.0f / a; }  // get_reciprocal

// The gradient reaching a where(a == 0, 0, 1.0 / a) from g at its output: torch's reciprocal backward
// -g * (1/a)^2, with g masked to 0 where a is 0 (so -0 * inf: NaN there).
inline float reciprocal_backward(float a, float g) {
  const float masked = a == 0.0f ? 0.0f : g * 1.0f;
  const float rr = 1.0f / a;
  return -masked * (rr * rr);
}

// A group's max |x| and the first element holding it (torch.max's index), times the range factor.
struct GroupMax {
  float amax = 0;
  int arg = 0;
  float mv = 0;  // amax * factor
};

GroupMax group_max(const float* t, int n, float factor) {
  GroupMax m;
  m.amax = std::fabs(t[0]);
  for (int i = 1; i < n; ++i) {
    const float a = std::fabs(t[i]);
    if (a > m.amax) {
      m.amax = a;
      m.arg = i;
    }
  }
  m.mv = m.amax * factor;
  return m;
}

// What one element's backward hands the group loop: the gradients reaching v and x (the latter without the
// maximum's path) and its terms of the two scale-gradient sums.
struct ElemGrad {
  float gv, gt, g_mul, g_scale;
};

// ---- the per-family scale policies; one group loop (below) serves all three ----
// A policy P has kGroup, kMaxGradInDtype (upstream takes the maximum before its fp32 cast, so the maximum's
// gradient is rounded to x's dtype), a per-group Scale from scale(t, factor) (holding GroupMax m), and
// qdq / code / elem_grad per element and max_grad(scale, sum of g_mul, sum of g_scale) -> the gradient at mv.

// MXFP: a shared E8M0 exponent per 32 inputs; elements through upstream's quant_element.
struct MxPolicy {
  static constexpr int kGroup = static_cast<int>(kMxGroup);
  static constexpr bool kMaxGradInDtype = false;
  int bits;
  float emax, max_norm, min_p, mscale;  // upstream's MXFP_FORMAT_CACHE row; mscale: 2^(mbits-2)

  explicit MxPolicy(int b)
      : bits(b), emax(b == 4 ? 2.0f : 8.0f), max_norm(b == 4 ? 6.0f : 448.0f), min_p(b == 4 ? 0.0f : -6.0f),
        mscale(b == 4 ? 2.0f : 8.0f) {}

  struct Scale {
    GroupMax m;
    float e = 0;         // clamped shared exponent
    float s = 1;         // 2^e
    bool passes = true;  // the exponent clamp did not bind: the gradient reaches the factor
    float exponent() const { return e; }
    uint8_t byte() const { return static_cast<uint8_t>(e + 127.0f); }
  };

  Scale scale(const float* t, float factor) const {
    Scale g;
    g.m = group_max(t, kGroup, factor);
    const float e0 = g.m.mv == 0.0f ? 1.0f : floor_log2(g.m.mv);
    const float d = e0 - emax;
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

  Elem elem(float t, float v, float s) const {
    Elem r;
    r.x1 = t / s + v;
    r.x2 = clampf(r.x1, -max_norm, max_norm);
    r.a0 = std::fabs(r.x2) + (r.x2 == 0.0f ? 1.0f : 0.0f);
    r.p1 = floor_log2(r.a0);
    r.q2 = pow2f(std::max(r.p1, min_p));
    r.y = (r.x2 / r.q2) * mscale;
    const float ay = std::fabs(r.y);
    const float h = ay - 0.5f;  // (|y| - 0.5) % 2 == 0: an even integer (never for negative h)
    const float mask = (h >= 0.0f && fpq::floor_nonneg(h) == h && (static_cast<int32_t>(h) & 1) == 0) ? 1.0f : 0.0f;
    const float rnd = signf(r.y) * (fpq::floor_nonneg(ay + 0.5f) - mask);
    r.z0 = rnd / mscale;
    r.z = r.z0 * r.q2;
    r.out = clampf(r.z, -max_norm, max_norm);
    return r;
  }

  float qdq(const Scale& g, float t, float v) const { return elem(t, v, g.s).out * g.s; }

  // E2M1 / E4M3 code of a stored qdq value w over its group's scale, as the packers re-derive it.
  uint8_t code(const Scale& g, float w) const {
    const float c = w / g.s;
    return bits == 4 ? fpq::e2m1_code(c) : fpq::e4m3_code(c);
  }

  ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const float s = g.s;
    const Elem e = elem(t, v, s);
    const float g_out = go * s;
    const float g_z = inside(e.z, max_norm) ? g_out : 0.0f;
    const float g_z0 = g_z * e.q2;
    const float g_q2b = g_z * e.z0;  // the second 2^p (undoing the scaling)
    const float g_r = g_z0 / mscale;
    const float sy = signf(e.y);
    const float g_ay = g_r * sy;         // through floor_ste(|y| + 0.5)
    const float g_y = g_ay * sy + 0.0f;  // abs's gradient, plus sign()'s zeros
    const float g_y0 = g_y * mscale;
    const float g_x2d = g_y0 / e.q2;
    const float g_q2 = -g_y0 * ((e.x2 / e.q2) / e.q2);
    const float ql = e.q2 * kLn2;
    const float g_p = g_q2 * ql + g_q2b * ql;
    const float g_p1 = e.p1 >= min_p ? g_p : 0.0f;
    const float g_a0 = g_p1 / (e.a0 * kLn2);
    const float g_x2 = g_x2d + g_a0 * signf(e.x2);
    const float g_x1 = inside(e.x1, max_norm) ? g_x2 : 0.0f;
    return {g_x1, g_x1 / s, go * e.out, -g_x1 * ((t / s) / s)};
  }

  float max_grad(const Scale& g, float sum_mul, float sum_div) const {
    const float g_s = sum_mul + sum_div;
    const float g_e = g.passes ? g_s * (g.s * kLn2) : 0.0f;
    const float g_log = g.m.mv == 0.0f ? 0.0f : g_e;
    return g_log / (g.m.mv * kLn2);  // 0 / 0 for an all-zero group, as torch's where + log2
  }
};

// One E2M1 element of the NV families: x scaled + v, clamped to [-6, 6], cast_to_fp4 (fp_numerics.h's value).
struct Fp4Elem {
  float sx, cx, f;  // scaled x + v, clamped, the element value
};

inline Fp4Elem fp4_elem(float sx) {
  Fp4Elem e;
  e.sx = sx;
  e.cx = clampf(sx, -6.0f, 6.0f);
  e.f = fpq::cast_to_fp4(e.cx);
  return e;
}

// cast_to_fp4's gradient at its input, masked by the [-6, 6] clamp before it (round_ste is an identity inside
// each band, the sign() factor passes none, the final clamp passes inside [-6, 6]): g_f reaches its output.
inline float fp4_backward(const Fp4Elem& e, float g_f) {
  const float sgn = signf(e.cx);
  const float a = std::fabs(e.cx);
  const float g_r2 = g_f * sgn;
  const float g_r = inside(std::fabs(e.f), 6.0f) ? g_r2 : 0.0f;
  // Exactly one band's mask is 1: its step's gradient, through round_ste's identity (x2 / 2, / 2 x 2).
  float g_a;
  if (a < 2.0f) g_a = (g_r / 2.0f) * 2.0f;
  else if (a < 4.0f) g_a = g_r;
  else g_a = (g_r * 2.0f) / 2.0f;
  const float g_cx = g_a * sgn + 0.0f;
  return inside(e.sx, 6.0f) ? g_cx : 0.0f;
}

// What both NV families' group scales hold: the maximum, the pre-cast scale gs * (mv * (1/6)) (NVFP4_E5M3: gs 1)
// and the scale's byte.
struct NvScaleBase {
  GroupMax m;
  float sc0 = 0;  // before the clamp
  uint8_t b = 0;
  uint8_t byte() const { return b; }
};

template <typename S>
S nv_scale_start(const float* t, float factor, float gs) {
  S g;
  g.m = group_max(t, static_cast<int>(kNvGroup), factor);
  g.sc0 = gs * (g.m.mv * fpq::kOneSixth);
  return g;
}

// NVFP4_E5M3 (upstream's nvfp4_v2 through ref_fp4_quant, global scale 1): a UE5M3 scale d per 16 inputs.
struct NvE5m3Policy {
  static constexpr int kGroup = static_cast<int>(kNvGroup);
  static constexpr bool kMaxGradInDtype = true;

  struct Scale : NvScaleBase {
    float d = 0;  // the UE5M3 scale as the qdq uses it ((cast - s) + s of the clipped value)
    float exponent() const { return d; }
  };

  Scale scale(const float* t, float factor) const {
    Scale g = nv_scale_start<Scale>(t, factor, 1.0f);
    const float sc1 = clampf(g.sc0, 0.0f, fpq::kUe5m3Max);
    g.b = ue5m3_encode(sc1);
    g.d = (ue5m3_decode(g.b) - sc1) + sc1;  // cast_to_ue5m3_ste's value
    return g;
  }

  static Fp4Elem elem(const Scale& g, float t, float v) { return fp4_elem((g.d == 0.0f ? 0.0f : t / g.d) + v); }
  float qdq(const Scale& g, float t, float v) const { return elem(g, t, v).f * g.d; }
  uint8_t code(const Scale& g, float w) const { return fpq::nv_code(w, g.d); }

  ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const float d = g.d;
    const Fp4Elem e = elem(g, t, v);
    const float g_sx = fp4_backward(e, go * d);
    const float g_div = d == 0.0f ? 0.0f : g_sx;
    return {g_sx, g_div / d, go * e.f, -g_div * ((t / d) / d)};
  }

  float max_grad(const Scale& g, float sum_mul, float sum_div) const {
    const float g_d = sum_mul + sum_div;
    const float g_sc0 = (g.sc0 >= 0.0f && g.sc0 <= fpq::kUe5m3Max) ? g_d * 1.0f : 0.0f;
    return (g_sc0 * 1.0f) * fpq::kOneSixth;
  }
};

// NVFP4 (upstream's ref_nvfp4_quant): an E4M3 scale per 16 inputs under the per-tensor global scale gs.
struct Nvfp4Policy {
  static constexpr int kGroup = static_cast<int>(kNvGroup);
  static constexpr bool kMaxGradInDtype = true;
  float gs;

  struct Scale : NvScaleBase {
    float s = 0;   // the E4M3 scale as the qdq uses it ((cast - s) + s of the clamped value)
    float dq = 0;  // s * (1 / gs)
    float os = 0;  // 1 / dq (0 for 0): what x is multiplied by
    float r = 0;   // 1 / os (0 for 0): what the element values are multiplied by
    float exponent() const { return s; }
  };

  Scale scale(const float* t, float factor) const {
    Scale g = nv_scale_start<Scale>(t, factor, gs);
    const float sc1 = clampf(g.sc0, -448.0f, 448.0f);
    const float cast = fp8_e4m3_to_float(float_to_fp8_e4m3(sc1));
    g.s = (cast - sc1) + sc1;  // float8_e4m3fn_ste's value
    g.b = float_to_fp8_e4m3(g.s);
    g.dq = g.s * reciprocal_or_zero(gs);
    g.os = reciprocal_or_zero(g.dq);
    g.r = reciprocal_or_zero(g.os);
    return g;
  }

  static Fp4Elem elem(const Scale& g, float t, float v) { return fp4_elem(t * g.os + v); }
  float qdq(const Scale& g, float t, float v) const { return elem(g, t, v).f * g.r; }
  // The packer's code of a stored qdq value w: w * (1 / (s * (1 / gs))), clamped to [-6, 6], cast_to_fp4.
  uint8_t code(const Scale& g, float w) const {
    return fpq::e2m1_code(fpq::cast_to_fp4(clampf(w * g.os, -6.0f, 6.0f)));
  }

  ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const Fp4Elem e = elem(g, t, v);
    const float g_sx = fp4_backward(e, go * g.r);
    return {g_sx, g_sx * g.os, go * e.f, g_sx * t};  // g_scale: the element scale os's terms
  }

  // Autograd's path through ref_nvfp4_quant's reciprocals back to mv.
  float max_grad(const Scale& g, float sum_mul, float sum_os) const {
    const float g_os = sum_os + reciprocal_backward(g.os, sum_mul);
    const float g_dq = reciprocal_backward(g.dq, g_os);
    const float g_s = g_dq * reciprocal_or_zero(gs);
    const float g_sc0 = inside(g.sc0, 448.0f) ? g_s : 0.0f;
    return (g_sc0 * gs) * fpq::kOneSixth;
  }
};

// Calls f with the policy of params' family.
template <typename F>
void with_policy(const FpQdqParams& p, F&& f) {
  if (p.nv_fp4) f(Nvfp4Policy{p.global_scale});
  else if (p.nv_e5m3) f(NvE5m3Policy{});
  else f(MxPolicy(p.bits));
}

// The forward of one group: qdq values q (fp32, before the dtype cast); returns the group's scale.
template <typename P>
typename P::Scale group_forward(const P& pol, const float* t, const float* v, float factor, float* q) {
  const typename P::Scale g = pol.scale(t, factor);
  for (int i = 0; i < P::kGroup; ++i) q[i] = pol.qdq(g, t[i], v ? v[i] : 0.0f);
  return g;
}

// The backward of one group: incoming gradient go[kGroup] (fp32 of the qdq's dtype); gv / gx (fp32, before the
// cast) per element and the factor's gradient, each written when not null.
template <typename P>
void group_backward(const P& pol, DType dt, const float* t, const float* v, float factor, const float* go, float* gv,
                    float* gmax, float* gx) {
  constexpr int n = P::kGroup;
  const typename P::Scale g = pol.scale(t, factor);
  float gmul[n], gscale[n], gt[n];
  for (int i = 0; i < n; ++i) {
    const ElemGrad e = pol.elem_grad(g, t[i], v ? v[i] : 0.0f, go[i]);
    if (gv) gv[i] = e.gv;
    gt[i] = e.gt;
    gmul[i] = e.g_mul;
    gscale[i] = e.g_scale;
  }
  if (!gmax && !gx) return;
  const float g_mv = pol.max_grad(g, fpq::torch_sum_lanes8<n>(gmul), fpq::torch_sum_lanes8<n>(gscale));
  if (gmax) *gmax = g_mv * g.m.amax;
  if (gx) {
    const auto rd = [dt](float x) { return P::kMaxGradInDtype ? round_to_dtype(dt, x) : x; };
    const float g_amax = rd(g_mv * factor);
    for (int i = 0; i < n; ++i) gx[i] = rd(rd(gt[i]) + (i == g.m.arg ? g_amax : 0.0f) * signf(t[i]));
  }
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
  with_policy(p, [&](const auto& pol) {
    constexpr int64_t G = std::decay_t<decltype(pol)>::kGroup;
    const int64_t ng = v.rows * (v.cols / G);
    for (int64_t gi = 0; gi < ng; ++gi) {
      float t[G], q[G];
      for (int64_t i = 0; i < G; ++i) t[i] = element_as_float(v.dtype, v.x, gi * G + i);
      const auto g = group_forward(pol, t, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi), q);
      exponent[gi] = g.exponent();
      if (scales) scales[gi] = g.byte();
      for (int64_t i = 0; i < G; ++i) {
        store_from_float(v.dtype, &q[i], 1, qdq, gi * G + i);
        if (codes) codes[gi * G + i] = pol.code(g, round_to_dtype(v.dtype, q[i]));
      }
    }
  });
}

void fp_qdq_backward_ref(const FpQdqView& v, const FpQdqParams& p, const void* grad, float* grad_v, float* grad_max,
                         void* grad_x) {
  fp_qdq_check(v, p, "fp_qdq_backward_ref");
  with_policy(p, [&](const auto& pol) {
    constexpr int64_t G = std::decay_t<decltype(pol)>::kGroup;
    const int64_t ng = v.rows * (v.cols / G);
    for (int64_t gi = 0; gi < ng; ++gi) {
      float t[G], go[G], gx[G];
      for (int64_t i = 0; i < G; ++i) {
        t[i] = element_as_float(v.dtype, v.x, gi * G + i);
        go[i] = element_as_float(v.dtype, grad, gi * G + i);
      }
      group_backward(pol, v.dtype, t, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi), go,
                     grad_v ? grad_v + gi * G : nullptr, grad_max ? grad_max + gi : nullptr, grad_x ? gx : nullptr);
      if (grad_x)
        for (int64_t i = 0; i < G; ++i) store_from_float(v.dtype, &gx[i], 1, grad_x, gi * G + i);
    }
  });
}

// ---- fast: rows in parallel, each row converted once ----

void fp_qdq_forward(const FpQdqView& v, const FpQdqParams& p, void* qdq, float* exponent, uint8_t* codes,
                    uint8_t* scales) {
  fp_qdq_check(v, p, "fp_qdq_forward");
  with_policy(p, [&](const auto& pol) {
    constexpr int64_t G = std::decay_t<decltype(pol)>::kGroup;
    const int64_t gpr = v.cols / G;
    parallel_for(v.rows, [&](int64_t r) {
      std::vector<float> row(static_cast<size_t>(v.cols)), out(static_cast<size_t>(v.cols));
      load_as_float(v.dtype, v.x, r * v.cols, v.cols, row.data());
      for (int64_t g = 0; g < gpr; ++g) {
        const int64_t gi = r * gpr + g;
        float* q = out.data() + g * G;
        const auto s = group_forward(pol, row.data() + g * G, v.v ? v.v + gi * G : nullptr,
                                     factor_of(v.max_scale, gi), q);
        exponent[gi] = s.exponent();
        if (scales) scales[gi] = s.byte();
        if (codes)
          for (int64_t i = 0; i < G; ++i) codes[gi * G + i] = pol.code(s, round_to_dtype(v.dtype, q[i]));
      }
      store_from_float(v.dtype, out.data(), v.cols, qdq, r * v.cols);
    });
  });
}

void fp_qdq_backward(const FpQdqView& v, const FpQdqParams& p, const void* grad, float* grad_v, float* grad_max,
                     void* grad_x) {
  fp_qdq_check(v, p, "fp_qdq_backward");
  with_policy(p, [&](const auto& pol) {
    constexpr int64_t G = std::decay_t<decltype(pol)>::kGroup;
    const int64_t gpr = v.cols / G;
    parallel_for(v.rows, [&](int64_t r) {
      std::vector<float> row(static_cast<size_t>(v.cols)), go(static_cast<size_t>(v.cols));
      std::vector<float> gx(grad_x ? static_cast<size_t>(v.cols) : 0);
      load_as_float(v.dtype, v.x, r * v.cols, v.cols, row.data());
      load_as_float(v.dtype, grad, r * v.cols, v.cols, go.data());
      for (int64_t g = 0; g < gpr; ++g) {
        const int64_t gi = r * gpr + g;
        group_backward(pol, v.dtype, row.data() + g * G, v.v ? v.v + gi * G : nullptr, factor_of(v.max_scale, gi),
                       go.data() + g * G, grad_v ? grad_v + gi * G : nullptr, grad_max ? grad_max + gi : nullptr,
                       grad_x ? gx.data() + g * G : nullptr);
      }
      if (grad_x) store_from_float(v.dtype, gx.data(), v.cols, grad_x, r * v.cols);
    });
  });
}

}  // namespace fastround::tune
