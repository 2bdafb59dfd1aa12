#include "fastround/tune/int_qdq.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"

namespace fastround::tune {

namespace {

void check_scale_dtype(DType sd, const char* site) {
  if (sd != DType::F16 && sd != DType::BF16 && sd != DType::F32)
    throw OptionError(std::string("[") + site + "] scale_dtype must be F16, BF16 or F32, got " +
                      std::string(dtype_name(sd)));
}

// torch promotes weight / scale to fp32 unless both are the same 16-bit dtype, which then divides in it.
bool divides_in_weight_dtype(DType w, DType sd) { return w == sd && w != DType::F32; }

// A group's scale and what its gradient needs, as upstream computes them from the frozen extremes and factors.
struct GroupScale {
  float s = 0;        // after the scale_dtype cast and the floor
  float zp = 0;       // asym zero point (rounded)
  float wlo = 0;      // asym: wmin * min_scale (fp32)
  bool passes = true; // the floor did not clamp: the scale's gradient reaches the factors
  int branch = 0;     // sym: +1 when the positive extreme wins (scale < 0), -1 when the negative wins, 0 tie
};

// SignRoundV2's scale: (init_scale * max_scale) in fp32, cast to scale_dtype, then the signed floor.
GroupScale init_group_scale(const IntQdqParams& p, float init, float smax) {
  GroupScale g;
  const float thr = round_to_dtype(p.scale_dtype, p.scale_thresh);
  const float pre = round_to_dtype(p.scale_dtype, init * smax);
  if (pre < 0) {
    g.passes = pre <= -thr;
    g.s = std::min(pre, -thr);
  } else {
    g.passes = pre >= thr;
    g.s = std::max(pre, thr);
  }
  return g;
}

GroupScale group_scale(const IntQdqParams& p, float wmin, float wmax, float smin, float smax) {
  GroupScale g;
  const float thr = round_to_dtype(p.scale_dtype, p.scale_thresh);
  if (p.sym) {
    const float qmax = static_cast<float>(1 << (p.bits - 1));
    const float a_neg = -(wmin * smin);
    const float a_pos = wmax * smax;
    const float m = (a_pos < a_neg) ? a_neg : -a_pos;  // ties take the negative branch, as upstream's sign
    g.branch = a_pos > a_neg ? 1 : (a_pos < a_neg ? -1 : 0);
    const float pre = round_to_dtype(p.scale_dtype, m / qmax);
    if (pre < 0) {
      g.passes = pre <= -thr;
      g.s = std::min(pre, -thr);
    } else {
      g.passes = pre >= thr;
      g.s = std::max(pre, thr);
    }
  } else {
    const float qmax = static_cast<float>((1 << p.bits) - 1);
    g.wlo = wmin * smin;
    const float whi = wmax * smax;
    const float pre = round_to_dtype(p.scale_dtype, (whi - g.wlo) / qmax);
    g.passes = pre >= thr;
    g.s = std::max(pre, thr);
    g.zp = std::nearbyint(-g.wlo / g.s);
  }
  return g;
}

float factor(const float* f, int64_t i) { return f ? f[i] : 1.0f; }

// Group gi's scale from the view: the init-scale form when the view has one, else the extremes and factors.
GroupScale scale_of(const IntQdqView& v, const IntQdqParams& p, int64_t gi) {
  if (v.init_scale) return init_group_scale(p, v.init_scale[gi], factor(v.max_scale, gi));
  return group_scale(p, v.wmin[gi], v.wmax[gi], factor(v.min_scale, gi), factor(v.max_scale, gi));
}

// Upstream's round_ste, (round(y) - y) + y: round(y) exactly, except that a zero is always +0 (round(-0.3) is -0).
inline float round_ste(float y) { return std::nearbyint(y) + 0.0f; }

// Writes the factor gradients of one group from the gradient reaching its (pre-floor) scale, in fp32.
void factor_grads(const IntQdqParams& p, const GroupScale& gsc, float wmin, float wmax, float g_scale, float g_wlo,
                  float* gmin, float* gmax, const float* init = nullptr) {
  float g_min = 0, g_max = 0;
  if (init) {
    // scale = init * max_scale in fp32 (the cast to scale_dtype passes the gradient back as fp32); no min path
    g_max = gsc.passes ? g_scale * *init : 0.0f;
  } else if (p.sym) {
    const float qmax = static_cast<float>(1 << (p.bits - 1));
    // m = sign * max(a_pos, a_neg) with sign -1 when a_pos wins or ties, +1 when a_neg wins.
    const float g_m = gsc.passes ? g_scale / qmax : 0.0f;
    const float g_max_ext = (gsc.branch >= 0 ? -1.0f : 1.0f) * g_m;
    float g_apos = 0, g_aneg = 0;
    if (gsc.branch > 0) g_apos = g_max_ext;
    else if (gsc.branch < 0) g_aneg = g_max_ext;
    else g_apos = g_aneg = g_max_ext / 2;
    g_min = -g_aneg * wmin;
    g_max = g_apos * wmax;
  } else {
    const float qmax = static_cast<float>((1 << p.bits) - 1);
    const float g_diff = gsc.passes ? g_scale / qmax : 0.0f;
    g_max = g_diff * wmax;
    g_min = (g_wlo - g_diff) * wmin;
  }
  if (gmin) *gmin = g_min;
  if (gmax) *gmax = g_max;
}

// Whether x = t / s rounds to the weight dtype, and the clamp range of the (zero-point shifted) codes.
struct CodeRange {
  bool wdiv;
  float lo, hi;
};

CodeRange code_range(const IntQdqView& v, const IntQdqParams& p) {
  const float lo = p.sym ? -static_cast<float>(1 << (p.bits - 1)) : 0.0f;
  const float hi = p.sym ? static_cast<float>((1 << (p.bits - 1)) - 1) : static_cast<float>((1 << p.bits) - 1);
  return {divides_in_weight_dtype(v.dtype, p.scale_dtype), lo, hi};
}

}  // namespace

void int_qdq_check(const IntQdqView& v, const IntQdqParams& p, const char* site) {
  require_float_source(v.dtype, site);
  check_scale_dtype(p.scale_dtype, site);
  if (!v.weight || !v.v || !v.wmin || !v.wmax)
    throw OptionError(std::string("[") + site + "] weight, v, wmin and wmax are required");
  if (v.group <= 0 || v.groups <= 0 || v.group * v.groups < v.cols)
    throw OptionError(std::string("[") + site + "] group layout does not cover the columns");
  if (p.bits < 2 || p.bits > 8) throw OptionError(std::string("[") + site + "] bits must be 2..8");
  if (v.init_scale && !p.sym)
    throw OptionError(std::string("[") + site + "] init_scale (SignRoundV2) needs a sym scheme");
}

void int_qdq_layout(IntQdqView& view, const IntQdqParams& params, const char* site) {
  if (view.rows <= 0 || view.cols <= 0)
    throw OptionError(std::string("[") + site + "] empty weight [" + std::to_string(view.rows) + ", " +
                      std::to_string(view.cols) + "]");
  if (params.group_size == 0 || params.group_size < -1)
    throw OptionError(std::string("[") + site + "] group_size must be -1 or positive, got " +
                      std::to_string(params.group_size));
  if (params.group_size == -1 || params.group_size >= view.cols) {
    view.group = view.cols;
    view.groups = 1;
  } else {
    view.group = params.group_size;
    view.groups = (view.cols + params.group_size - 1) / params.group_size;
  }
}

void int_group_extremes(DType dtype, const void* weight, int64_t rows, int64_t cols, int64_t group, int64_t groups,
                        float* wmin, float* wmax) {
  require_float_source(dtype, "int_group_extremes");
  parallel_for(rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(cols));
    load_as_float(dtype, weight, r * cols, cols, row.data());
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, c1 = std::min(cols, c0 + group);
      float lo = 0, hi = 0;  // padding zeros and upstream's clamp both put 0 in the range
      for (int64_t c = c0; c < c1; ++c) {
        lo = std::min(lo, row[c]);
        hi = std::max(hi, row[c]);
      }
      wmin[r * groups + g] = lo;
      wmax[r * groups + g] = hi;
    }
  });
}

// ---- reference: element by element, one group after another ----

void int_qdq_forward_ref(const IntQdqView& v, const IntQdqParams& p, void* qdq, float* scale, uint8_t* codes,
                         int32_t* zeros) {
  int_qdq_check(v, p, "int_qdq_forward_ref");
  const CodeRange cr = code_range(v, p);
  const bool wdiv = cr.wdiv;
  const float lo = cr.lo, hi = cr.hi;
  for (int64_t r = 0; r < v.rows; ++r) {
    for (int64_t g = 0; g < v.groups; ++g) {
      const int64_t gi = r * v.groups + g;
      const GroupScale gs = scale_of(v, p, gi);
      scale[gi] = gs.s;
      if (zeros) zeros[gi] = p.sym ? (1 << (p.bits - 1)) : static_cast<int32_t>(gs.zp);
      for (int64_t j = 0; j < v.group; ++j) {
        const int64_t c = g * v.group + j;
        if (c >= v.cols) break;
        const float t = element_as_float(v.dtype, v.weight, r * v.cols + c);
        float x = t / gs.s;
        if (wdiv) x = round_to_dtype(v.dtype, x);
        const float rq = round_ste(x + v.v[gi * v.group + j]);
        float out;
        if (p.sym) {
          const float q = std::min(std::max(rq, lo), hi);
          out = gs.s * q;
          if (codes) codes[r * v.cols + c] = static_cast<uint8_t>(q - lo);
        } else {
          const float q = std::min(std::max(rq + gs.zp, lo), hi);
          out = gs.s * (q - gs.zp);
          if (codes) codes[r * v.cols + c] = static_cast<uint8_t>(q);
        }
        store_from_float(v.dtype, &out, 1, qdq, r * v.cols + c);
      }
    }
  }
}

void int_qdq_backward_ref(const IntQdqView& v, const IntQdqParams& p, const void* grad, float* grad_v, float* grad_min,
                          float* grad_max) {
  int_qdq_check(v, p, "int_qdq_backward_ref");
  const CodeRange cr = code_range(v, p);
  const bool wdiv = cr.wdiv;
  const float lo = cr.lo, hi = cr.hi;
  for (int64_t r = 0; r < v.rows; ++r) {
    for (int64_t g = 0; g < v.groups; ++g) {
      const int64_t gi = r * v.groups + g;
      const float wmin = v.wmin[gi], wmax = v.wmax[gi];
      const GroupScale gs = scale_of(v, p, gi);
      float sum_mul = 0, sum_div = 0, sum_zp_in = 0, sum_zp_out = 0;
      for (int64_t j = 0; j < v.group; ++j) {
        const int64_t c = g * v.group + j;
        float* gv = grad_v + gi * v.group + j;
        if (c >= v.cols) {  // padding: its qdq is dropped, so no gradient
          *gv = 0;
          continue;
        }
        const float t = element_as_float(v.dtype, v.weight, r * v.cols + c);
        const float go = element_as_float(v.dtype, grad, r * v.cols + c);
        float x = t / gs.s;
        if (wdiv) x = round_to_dtype(v.dtype, x);
        const float rq = round_ste(x + v.v[gi * v.group + j]);
        const float u = p.sym ? rq : rq + gs.zp;
        const bool inside = u >= lo && u <= hi;
        const float q = std::min(std::max(u, lo), hi);
        const float gq = go * gs.s;
        const float gu = inside ? gq : 0.0f;
        *gv = gu;
        // d(s * q)/ds and d(t / s)/ds in fp32: autograd sums each over the group before casting it to the scale's
        // dtype; the zero point (fp32) gets +gu through q = r + zp and -gq through q - zp, summed apart
        sum_mul += go * (p.sym ? q : q - gs.zp);
        sum_div += -gu * ((t / gs.s) / gs.s);
        sum_zp_in += gu;
        sum_zp_out += -gq;
      }
      if (!grad_min && !grad_max) continue;
      float g_scale = round_to_dtype(p.scale_dtype, round_to_dtype(p.scale_dtype, sum_mul) +
                                                        round_to_dtype(p.scale_dtype, sum_div));
      float g_wlo = 0;
      if (!p.sym) {
        // zp = round(-wlo / s): gradient to wlo and, rounded to the scale dtype, to s
        const float sum_zp = sum_zp_in + sum_zp_out;
        g_wlo = -(sum_zp / gs.s);
        g_scale = round_to_dtype(p.scale_dtype,
                                 g_scale + round_to_dtype(p.scale_dtype, -sum_zp * ((-gs.wlo / gs.s) / gs.s)));
      }
      factor_grads(p, gs, wmin, wmax, g_scale, g_wlo, grad_min ? grad_min + gi : nullptr,
                   grad_max ? grad_max + gi : nullptr, v.init_scale ? v.init_scale + gi : nullptr);
    }
  }
}

// ---- fast: rows in parallel, each row converted once, the group loops free of dtype branches ----

void int_qdq_forward(const IntQdqView& v, const IntQdqParams& p, void* qdq, float* scale, uint8_t* codes,
                     int32_t* zeros) {
  int_qdq_check(v, p, "int_qdq_forward");
  const CodeRange cr = code_range(v, p);
  const bool wdiv = cr.wdiv;
  const float lo = cr.lo, hi = cr.hi;
  parallel_for(v.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(v.cols)), out(static_cast<size_t>(v.cols));
    load_as_float(v.dtype, v.weight, r * v.cols, v.cols, row.data());
    for (int64_t g = 0; g < v.groups; ++g) {
      const int64_t gi = r * v.groups + g;
      const GroupScale gs = scale_of(v, p, gi);
      scale[gi] = gs.s;
      if (zeros) zeros[gi] = p.sym ? (1 << (p.bits - 1)) : static_cast<int32_t>(gs.zp);
      const int64_t c0 = g * v.group, n = std::min(v.cols, c0 + v.group) - c0;
      const float* t = row.data() + c0;
      const float* vv = v.v + gi * v.group;
      float* o = out.data() + c0;
      const float s = gs.s, zp = p.sym ? 0.0f : gs.zp;
      // Upstream rounds with round_ste, (round(x) - x) + x, whose zeros are always +0 (x + -x): adding +0.0f
      // turns nearbyint's -0 (of -0.3, say) into +0, so a zero code dequantizes to s * +0, signed like the scale.
      if (p.sym) {
        for (int64_t j = 0; j < n; ++j) {
          float x = t[j] / s;
          if (wdiv) x = round_to_dtype(v.dtype, x);
          const float q = std::min(std::max(round_ste(x + vv[j]), lo), hi);
          o[j] = s * q;
          if (codes) codes[r * v.cols + c0 + j] = static_cast<uint8_t>(q - lo);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          float x = t[j] / s;
          if (wdiv) x = round_to_dtype(v.dtype, x);
          const float q = std::min(std::max(round_ste(x + vv[j]) + zp, lo), hi);
          o[j] = s * (q - zp);
          if (codes) codes[r * v.cols + c0 + j] = static_cast<uint8_t>(q);
        }
      }
    }
    store_from_float(v.dtype, out.data(), v.cols, qdq, r * v.cols);
  });
}

void int_qdq_backward(const IntQdqView& v, const IntQdqParams& p, const void* grad, float* grad_v, float* grad_min,
                      float* grad_max) {
  int_qdq_check(v, p, "int_qdq_backward");
  const CodeRange cr = code_range(v, p);
  const bool wdiv = cr.wdiv;
  const float lo = cr.lo, hi = cr.hi;
  const DType sd = p.scale_dtype;
  parallel_for(v.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(v.cols)), gout(static_cast<size_t>(v.cols));
    load_as_float(v.dtype, v.weight, r * v.cols, v.cols, row.data());
    load_as_float(v.dtype, grad, r * v.cols, v.cols, gout.data());
    for (int64_t g = 0; g < v.groups; ++g) {
      const int64_t gi = r * v.groups + g;
      const float wmin = v.wmin[gi], wmax = v.wmax[gi];
      const GroupScale gs = scale_of(v, p, gi);
      const int64_t c0 = g * v.group, n = std::min(v.cols, c0 + v.group) - c0;
      const float* t = row.data() + c0;
      const float* go = gout.data() + c0;
      const float* vv = v.v + gi * v.group;
      float* gv = grad_v + gi * v.group;
      const float s = gs.s, zp = p.sym ? 0.0f : gs.zp;
      float sum_mul = 0, sum_div = 0, sum_zp_in = 0, sum_zp_out = 0;
      for (int64_t j = 0; j < n; ++j) {
        float x = t[j] / s;
        if (wdiv) x = round_to_dtype(v.dtype, x);
        const float u = round_ste(x + vv[j]) + zp;
        const bool inside = u >= lo && u <= hi;
        const float q = std::min(std::max(u, lo), hi);
        const float gq = go[j] * s;
        const float gu = inside ? gq : 0.0f;
        gv[j] = gu;
        sum_mul += go[j] * (q - zp);
        sum_div += -gu * ((t[j] / s) / s);
        sum_zp_in += gu;
        sum_zp_out += -gq;
      }
      std::fill(gv + n, gv + v.group, 0.0f);
      if (!grad_min && !grad_max) continue;
      float g_scale = round_to_dtype(sd, round_to_dtype(sd, sum_mul) + round_to_dtype(sd, sum_div));
      float g_wlo = 0;
      if (!p.sym) {
        const float sum_zp = sum_zp_in + sum_zp_out;
        g_wlo = -(sum_zp / s);
        g_scale = round_to_dtype(sd, g_scale + round_to_dtype(sd, -sum_zp * ((-gs.wlo / s) / s)));
      }
      factor_grads(p, gs, wmin, wmax, g_scale, g_wlo, grad_min ? grad_min + gi : nullptr,
                   grad_max ? grad_max + gi : nullptr, v.init_scale ? v.init_scale + gi : nullptr);
    }
  });
}

}  // namespace fastround::tune
