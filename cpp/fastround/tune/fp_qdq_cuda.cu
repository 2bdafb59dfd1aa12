// The CUDA twin of fp_qdq.cpp. Bit-for-bit equality with the CPU kernels rests on the rules of int_qdq_cuda.cu:
// every fp32 operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn),
// never contracted into an FMA; floor / log2 / 2^k are computed as fp_numerics.h does (exponent bits, the double
// log2 only near a binade's top); min/max/clamp are the CPU's ternaries; fp16/bf16 rounding goes through
// common/half.h. A group's two scale-gradient sums keep torch's 8-lane order, as the CPU kernel does.
//
// Work split: one thread per group (32 elements MXFP, 16 NVFP4_E5M3 / NVFP4; grid-stride), which runs the CPU's
// group code (the same per-family scale policies, a kernel per dtype and family); a 4096 x 4096 MXFP weight is
// 512K threads.
#include "fastround/tune/fp_qdq_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastround/common/convert.h"
#include "fastround/tune/cuda_elements.cuh"
#include "fastround/tune/cuda_launch.cuh"
#include "fastround/common/error.h"

namespace fastround::tune {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr float kLn2 = static_cast<float>(0.6931471805599453);

using cuda::check_launch;
using cuda::load_el;
using cuda::round_to;
using cuda::store_el;
using cuda::with_float_dtype;

__device__ __forceinline__ float d_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
__device__ __forceinline__ float d_max(float a, float b) { return a < b ? b : a; }
__device__ __forceinline__ float d_sign(float v) { return static_cast<float>((v > 0.0f) - (v < 0.0f)); }
__device__ __forceinline__ float d_abs(float v) { return bits_float(float_bits(v) & 0x7FFFFFFFu); }
__device__ __forceinline__ bool inside(float x, float b) { return x >= -b && x <= b; }

// fp_numerics.h's floor_log2 and pow2f.
__device__ __forceinline__ float d_floor_log2(float a) {
  const uint32_t u = float_bits(a);
  const uint32_t exp = (u >> 23) & 0xFFu;
  if (exp == 0 || exp == 0xFFu || (u & 0x7FFFFFu) >= 0x7FFE00u)
    return floorf(static_cast<float>(log2(static_cast<double>(a))));
  return static_cast<float>(static_cast<int>(exp) - 127);
}

__device__ __forceinline__ float d_pow2(float e) {
  const int k = static_cast<int>(e);
  if (k >= -126 && k <= 127) return bits_float(static_cast<uint32_t>(k + 127) << 23);
  if (k >= -149 && k < -126) return bits_float(1u << (k + 149));
  return k < -149 ? 0.0f : bits_float(0x7F800000u);
}

// floor for 0 <= v < 2^31 (fp_numerics.h's floor_nonneg).
__device__ __forceinline__ float d_floor_nonneg(float v) { return static_cast<float>(static_cast<int32_t>(v)); }

// fp_numerics.h's e2m1_code / e4m3_code.
__constant__ float kE2M1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

__device__ __forceinline__ uint8_t d_e2m1_code(float s) {
  const uint32_t u = float_bits(s);
  const uint32_t mag = u & 0x7FFFFFFFu, exp = mag >> 23, man = mag & 0x7FFFFFu;
  const uint8_t sign = static_cast<uint8_t>((u >> 28) & 0x8u);
  if (mag == 0) return sign;
  if (exp >= 127 && exp <= 129 && (man & 0x3FFFFFu) == 0)
    return static_cast<uint8_t>(sign | (2 * (exp - 127) + 2 + (man >> 22)));
  if (mag == 0x3F000000u) return static_cast<uint8_t>(sign | 1u);
  const float a = d_abs(s);
  uint8_t idx = 0;
  if (!(a != a)) {
    float best = d_abs(__fsub_rn(a, kE2M1[0]));
    for (uint8_t k = 1; k < 8; ++k) {
      const float d = d_abs(__fsub_rn(a, kE2M1[k]));
      if (d < best) {
        best = d;
        idx = k;
      }
    }
  }
  return static_cast<uint8_t>(idx | ((u >> 31) ? 0x8u : 0x0u));
}

__device__ __forceinline__ uint8_t d_e4m3_code(float f) {
  const uint32_t x = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  const float a = d_abs(f);
  if (a >= 480.0f) return static_cast<uint8_t>(sign | 0x7Fu);
  if (f != f) return static_cast<uint8_t>(sign | 0x7Fu);
  if (a >= 464.0f) return static_cast<uint8_t>(sign | 0x7Eu);
  if (a < 0.015625f) return static_cast<uint8_t>(sign | static_cast<uint32_t>(rintf(__fmul_rn(a, 512.0f))));
  uint32_t u = float_bits(a);
  u += 0x7FFFFu + ((u >> 20) & 1u);
  const uint32_t exp = (u >> 23) - 120u;
  return static_cast<uint8_t>(sign | (exp << 3) | ((u >> 20) & 0x7u));
}

// ---- NVFP4_E5M3 (fp_qdq.cpp's nv_* functions; fp_rtn.cpp's UE5M3 codec, fp_numerics.h's cast_to_fp4) ----

constexpr float kUe5m3Max = 114688.0f;
constexpr float kOneSixth = static_cast<float>(1.0 / 6.0);

__device__ __forceinline__ float d_rne_nonneg(float v) { return __fsub_rn(__fadd_rn(v, 8388608.0f), 8388608.0f); }

__device__ __forceinline__ uint8_t d_ue5m3_encode(float v) {
  v = d_clamp(v, 0.0f, kUe5m3Max);
  if (v < 6.103515625e-05f) {
    const float m = rintf(__fmul_rn(v, 131072.0f));
    return static_cast<uint8_t>(m < 254.0f ? m : 254.0f);
  }
  int ex = 0;
  const float mant = frexpf(v, &ex);
  int m3 = static_cast<int>(rintf(__fmul_rn(__fsub_rn(mant, 0.5f), 16.0f)));
  int e5 = ex + 14;
  if (m3 == 8) {
    m3 = 0;
    ++e5;
  }
  const int code = (e5 << 3) | m3;
  return static_cast<uint8_t>(code < 0 ? 0 : (code > 254 ? 254 : code));
}

__device__ __forceinline__ float d_ue5m3_decode(uint8_t b) {
  if (b == 0) return 0.0f;
  const int e = (b >> 3) & 31, m = b & 7;
  if (e == 31 && m == 7) return bits_float(0x7FC00000u);
  if (e == 0) return __fmul_rn(__fdiv_rn(static_cast<float>(m), 8.0f), 6.103515625e-05f);
  return ldexpf(__fadd_rn(1.0f, __fdiv_rn(static_cast<float>(m), 8.0f)), e - 15);
}

__device__ __forceinline__ float d_cast_to_fp4(float y) {
  const bool nan = y != y;
  const float sgn = nan ? 0.0f : d_sign(y);
  const float a = d_abs(y);
  float r;
  if (nan) r = a;
  else if (a < 2.0f) r = __fdiv_rn(d_rne_nonneg(__fmul_rn(2.0f, a)), 2.0f);
  else if (a < 4.0f) r = d_rne_nonneg(a);
  else r = __fmul_rn(2.0f, d_rne_nonneg(__fdiv_rn(a < 16.0f ? a : 16.0f, 2.0f)));
  r = (r != r) ? r : d_clamp(r, -6.0f, 6.0f);
  return __fmul_rn(r, sgn);
}

__device__ __forceinline__ uint8_t d_nv_code(float x, float d) {
  float s = __fdiv_rn(x, d);
  if (!(s != s)) s = d_clamp(s, -6.0f, 6.0f);
  return d_e2m1_code(d_cast_to_fp4(s));
}

// ---- NVFP4 (fp_qdq.cpp's nv4_* functions: E4M3 group scales under the global scale gs) ----

__device__ __forceinline__ float d_e4m3_decode(uint8_t b) {  // fp_codes.h fp8_e4m3_to_float
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu, mant = b & 0x7u;
  if (exp == 0xFu && mant == 0x7u) return bits_float(sign | 0x7FC00000u);
  if (exp == 0) return bits_float(float_bits(__fmul_rn(static_cast<float>(mant), 1.0f / 512.0f)) | sign);
  return bits_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

__device__ __forceinline__ float d_recip0(float a) { return a == 0.0f ? 0.0f : __fdiv_rn(1.0f, a); }

// fp_qdq.cpp reciprocal_backward: -g * (1/a)^2 with g masked where a is 0 (NaN there, as autograd).
__device__ __forceinline__ float d_reciprocal_backward(float a, float g) {
  const float masked = a == 0.0f ? 0.0f : __fmul_rn(g, 1.0f);
  const float rr = __fdiv_rn(1.0f, a);
  return __fmul_rn(-masked, __fmul_rn(rr, rr));
}

// torch's fp32 sum of N (16 or 32) contiguous values: 8 lanes, then the lanes in order (fp_numerics.h
// torch_sum_lanes8<N>, whose 16-value lanes start from 0 + v).
template <int N>
__device__ __forceinline__ float sum_lanes8(const float* v) {
  float lanes[8];
  for (int l = 0; l < 8; ++l) {
    float a = N == 16 ? __fadd_rn(0.0f, v[l]) : v[l];
    for (int k = 1; k < N / 8; ++k) a = __fadd_rn(a, v[8 * k + l]);
    lanes[l] = a;
  }
  float acc = 0.0f;
  for (int l = 0; l < 8; ++l) acc = __fadd_rn(acc, lanes[l]);
  return acc;
}

// fp_qdq.cpp's GroupMax / group_max.
struct GroupMax {
  float amax, mv;
  int arg;
};

__device__ __forceinline__ GroupMax group_max(const float* t, int n, float factor) {
  GroupMax m;
  m.amax = d_abs(t[0]);
  m.arg = 0;
  for (int i = 1; i < n; ++i) {
    const float a = d_abs(t[i]);
    if (a > m.amax) {
      m.amax = a;
      m.arg = i;
    }
  }
  m.mv = __fmul_rn(m.amax, factor);
  return m;
}

struct ElemGrad {
  float gv, gt, g_mul, g_scale;
};

// ---- the per-family scale policies of fp_qdq.cpp, one group loop (the kernels below) serving all three ----

struct MxPolicy {
  static constexpr int kGroup = static_cast<int>(kMxGroup);
  static constexpr bool kMaxGradInDtype = false;
  int bits;
  float emax, max_norm, min_p, mscale;

  struct Scale {
    GroupMax m;
    float e, s;
    bool passes;
    __device__ float exponent() const { return e; }
    __device__ uint8_t byte() const { return static_cast<uint8_t>(__fadd_rn(e, 127.0f)); }
  };

  __device__ __forceinline__ Scale scale(const float* t, float factor) const {
    Scale g;
    g.m = group_max(t, kGroup, factor);
    const float e0 = g.m.mv == 0.0f ? 1.0f : d_floor_log2(g.m.mv);
    const float d = __fsub_rn(e0, emax);
    g.passes = d >= -127.0f && d <= 127.0f;
    g.e = d_clamp(d, -127.0f, 127.0f);
    g.s = d_pow2(g.e);
    return g;
  }

  struct Elem {
    float x1, x2, a0, p1, q2, y, z0, z, out;
  };

  __device__ __forceinline__ Elem elem(float t, float v, float s) const {
    Elem r;
    r.x1 = __fadd_rn(__fdiv_rn(t, s), v);
    r.x2 = d_clamp(r.x1, -max_norm, max_norm);
    r.a0 = __fadd_rn(d_abs(r.x2), r.x2 == 0.0f ? 1.0f : 0.0f);
    r.p1 = d_floor_log2(r.a0);
    r.q2 = d_pow2(d_max(r.p1, min_p));
    r.y = __fmul_rn(__fdiv_rn(r.x2, r.q2), mscale);
    const float ay = d_abs(r.y);
    const float h = __fsub_rn(ay, 0.5f);
    const float mask = (h >= 0.0f && d_floor_nonneg(h) == h && (static_cast<int32_t>(h) & 1) == 0) ? 1.0f : 0.0f;
    const float rnd = __fmul_rn(d_sign(r.y), __fsub_rn(d_floor_nonneg(__fadd_rn(ay, 0.5f)), mask));
    r.z0 = __fdiv_rn(rnd, mscale);
    r.z = __fmul_rn(r.z0, r.q2);
    r.out = d_clamp(r.z, -max_norm, max_norm);
    return r;
  }

  __device__ __forceinline__ float qdq(const Scale& g, float t, float v) const {
    return __fmul_rn(elem(t, v, g.s).out, g.s);
  }

  __device__ __forceinline__ uint8_t code(const Scale& g, float w) const {
    const float c = __fdiv_rn(w, g.s);
    return bits == 4 ? d_e2m1_code(c) : d_e4m3_code(c);
  }

  __device__ __forceinline__ ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const float s = g.s;
    const Elem e = elem(t, v, s);
    const float g_out = __fmul_rn(go, s);
    const float g_z = inside(e.z, max_norm) ? g_out : 0.0f;
    const float g_z0 = __fmul_rn(g_z, e.q2);
    const float g_q2b = __fmul_rn(g_z, e.z0);
    const float g_r = __fdiv_rn(g_z0, mscale);
    const float sy = d_sign(e.y);
    const float g_ay = __fmul_rn(g_r, sy);
    const float g_y = __fadd_rn(__fmul_rn(g_ay, sy), 0.0f);
    const float g_y0 = __fmul_rn(g_y, mscale);
    const float g_x2d = __fdiv_rn(g_y0, e.q2);
    const float g_q2 = __fmul_rn(-g_y0, __fdiv_rn(__fdiv_rn(e.x2, e.q2), e.q2));
    const float ql = __fmul_rn(e.q2, kLn2);
    const float g_p = __fadd_rn(__fmul_rn(g_q2, ql), __fmul_rn(g_q2b, ql));
    const float g_p1 = e.p1 >= min_p ? g_p : 0.0f;
    const float g_a0 = __fdiv_rn(g_p1, __fmul_rn(e.a0, kLn2));
    const float g_x2 = __fadd_rn(g_x2d, __fmul_rn(g_a0, d_sign(e.x2)));
    const float g_x1 = inside(e.x1, max_norm) ? g_x2 : 0.0f;
    return {g_x1, __fdiv_rn(g_x1, s), __fmul_rn(go, e.out), __fmul_rn(-g_x1, __fdiv_rn(__fdiv_rn(t, s), s))};
  }

  __device__ __forceinline__ float max_grad(const Scale& g, float sum_mul, float sum_div) const {
    const float g_s = __fadd_rn(sum_mul, sum_div);
    const float g_e = g.passes ? __fmul_rn(g_s, __fmul_rn(g.s, kLn2)) : 0.0f;
    const float g_log = g.m.mv == 0.0f ? 0.0f : g_e;
    return __fdiv_rn(g_log, __fmul_rn(g.m.mv, kLn2));
  }
};

MxPolicy mx_policy(int bits) {
  return bits == 4 ? MxPolicy{4, 2.0f, 6.0f, 0.0f, 2.0f} : MxPolicy{8, 8.0f, 448.0f, -6.0f, 8.0f};
}

struct Fp4Elem {
  float sx, f;
};

__device__ __forceinline__ Fp4Elem fp4_elem(float sx) { return {sx, d_cast_to_fp4(d_clamp(sx, -6.0f, 6.0f))}; }

// fp_qdq.cpp fp4_backward: cast_to_fp4's gradient at its input, masked by the clamp before it.
__device__ __forceinline__ float fp4_backward(const Fp4Elem& e, float g_f) {
  const float cx = d_clamp(e.sx, -6.0f, 6.0f);
  const float sgn = d_sign(cx);
  const float ab = d_abs(cx);
  const float g_r2 = __fmul_rn(g_f, sgn);
  const float g_r = inside(d_abs(e.f), 6.0f) ? g_r2 : 0.0f;
  float g_a;
  if (ab < 2.0f) g_a = __fmul_rn(__fdiv_rn(g_r, 2.0f), 2.0f);
  else if (ab < 4.0f) g_a = g_r;
  else g_a = __fdiv_rn(__fmul_rn(g_r, 2.0f), 2.0f);
  const float g_cx = __fadd_rn(__fmul_rn(g_a, sgn), 0.0f);
  return inside(e.sx, 6.0f) ? g_cx : 0.0f;
}

// fp_qdq.cpp NvScaleBase / nv_scale_start.
struct NvScaleBase {
  GroupMax m;
  float sc0;
  uint8_t b;
  __device__ uint8_t byte() const { return b; }
};

template <typename S>
__device__ __forceinline__ S nv_scale_start(const float* t, float factor, float gs) {
  S g;
  g.m = group_max(t, static_cast<int>(kNvGroup), factor);
  g.sc0 = __fmul_rn(gs, __fmul_rn(g.m.mv, kOneSixth));
  return g;
}

struct NvE5m3Policy {
  static constexpr int kGroup = static_cast<int>(kNvGroup);
  static constexpr bool kMaxGradInDtype = true;

  struct Scale : NvScaleBase {
    float d;
    __device__ float exponent() const { return d; }
  };

  __device__ __forceinline__ Scale scale(const float* t, float factor) const {
    Scale g = nv_scale_start<Scale>(t, factor, 1.0f);
    const float sc1 = d_clamp(g.sc0, 0.0f, kUe5m3Max);
    g.b = d_ue5m3_encode(sc1);
    g.d = __fadd_rn(__fsub_rn(d_ue5m3_decode(g.b), sc1), sc1);
    return g;
  }

  __device__ __forceinline__ Fp4Elem elem(const Scale& g, float t, float v) const {
    return fp4_elem(__fadd_rn(g.d == 0.0f ? 0.0f : __fdiv_rn(t, g.d), v));
  }
  __device__ __forceinline__ float qdq(const Scale& g, float t, float v) const {
    return __fmul_rn(elem(g, t, v).f, g.d);
  }
  __device__ __forceinline__ uint8_t code(const Scale& g, float w) const { return d_nv_code(w, g.d); }

  __device__ __forceinline__ ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const float d = g.d;
    const Fp4Elem e = elem(g, t, v);
    const float g_sx = fp4_backward(e, __fmul_rn(go, d));
    const float g_div = d == 0.0f ? 0.0f : g_sx;
    return {g_sx, __fdiv_rn(g_div, d), __fmul_rn(go, e.f), __fmul_rn(-g_div, __fdiv_rn(__fdiv_rn(t, d), d))};
  }

  __device__ __forceinline__ float max_grad(const Scale& g, float sum_mul, float sum_div) const {
    const float g_d = __fadd_rn(sum_mul, sum_div);
    const float g_sc0 = (g.sc0 >= 0.0f && g.sc0 <= kUe5m3Max) ? __fmul_rn(g_d, 1.0f) : 0.0f;
    return __fmul_rn(__fmul_rn(g_sc0, 1.0f), kOneSixth);
  }
};

struct Nvfp4Policy {
  static constexpr int kGroup = static_cast<int>(kNvGroup);
  static constexpr bool kMaxGradInDtype = true;
  float gs;

  struct Scale : NvScaleBase {
    float s, dq, os, r;
    __device__ float exponent() const { return s; }
  };

  __device__ __forceinline__ Scale scale(const float* t, float factor) const {
    Scale g = nv_scale_start<Scale>(t, factor, gs);
    const float sc1 = d_clamp(g.sc0, -448.0f, 448.0f);
    g.s = __fadd_rn(__fsub_rn(d_e4m3_decode(d_e4m3_code(sc1)), sc1), sc1);
    g.b = d_e4m3_code(g.s);
    g.dq = __fmul_rn(g.s, d_recip0(gs));
    g.os = d_recip0(g.dq);
    g.r = d_recip0(g.os);
    return g;
  }

  __device__ __forceinline__ Fp4Elem elem(const Scale& g, float t, float v) const {
    return fp4_elem(__fadd_rn(__fmul_rn(t, g.os), v));
  }
  __device__ __forceinline__ float qdq(const Scale& g, float t, float v) const {
    return __fmul_rn(elem(g, t, v).f, g.r);
  }
  __device__ __forceinline__ uint8_t code(const Scale& g, float w) const {
    return d_e2m1_code(d_cast_to_fp4(d_clamp(__fmul_rn(w, g.os), -6.0f, 6.0f)));
  }

  __device__ __forceinline__ ElemGrad elem_grad(const Scale& g, float t, float v, float go) const {
    const Fp4Elem e = elem(g, t, v);
    const float g_sx = fp4_backward(e, __fmul_rn(go, g.r));
    return {g_sx, __fmul_rn(g_sx, g.os), __fmul_rn(go, e.f), __fmul_rn(g_sx, t)};
  }

  __device__ __forceinline__ float max_grad(const Scale& g, float sum_mul, float sum_os) const {
    const float g_os = __fadd_rn(sum_os, d_reciprocal_backward(g.os, sum_mul));
    const float g_dq = d_reciprocal_backward(g.dq, g_os);
    const float g_s = __fmul_rn(g_dq, d_recip0(gs));
    const float g_sc0 = inside(g.sc0, 448.0f) ? g_s : 0.0f;
    return __fmul_rn(__fmul_rn(g_sc0, gs), kOneSixth);
  }
};

struct Args {
  const void* x;
  const float* v;
  const float* max_scale;
  int64_t groups;
};

template <DType D, typename P>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(P pol, Args a, void* qdq, float* exponent, uint8_t* codes, uint8_t* scales) {
  constexpr int n = P::kGroup;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < a.groups;
       gi += static_cast<int64_t>(gridDim.x) * kThreads) {
    float t[n];
    for (int i = 0; i < n; ++i) t[i] = load_el<D>(a.x, gi * n + i);
    const typename P::Scale g = pol.scale(t, a.max_scale ? a.max_scale[gi] : 1.0f);
    exponent[gi] = g.exponent();
    if (scales) scales[gi] = g.byte();
    for (int i = 0; i < n; ++i) {
      const float q = pol.qdq(g, t[i], a.v ? a.v[gi * n + i] : 0.0f);
      store_el<D>(qdq, gi * n + i, q);
      if (codes) codes[gi * n + i] = pol.code(g, round_to<D>(q));
    }
  }
}

template <DType D, typename P>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(P pol, Args a, const void* grad, float* grad_v, float* grad_max, void* grad_x) {
  constexpr int n = P::kGroup;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < a.groups;
       gi += static_cast<int64_t>(gridDim.x) * kThreads) {
    float t[n], gmul[n], gscale[n], gt[n];
    const float factor = a.max_scale ? a.max_scale[gi] : 1.0f;
    for (int i = 0; i < n; ++i) t[i] = load_el<D>(a.x, gi * n + i);
    const typename P::Scale g = pol.scale(t, factor);
    for (int i = 0; i < n; ++i) {
      const ElemGrad e = pol.elem_grad(g, t[i], a.v ? a.v[gi * n + i] : 0.0f, load_el<D>(grad, gi * n + i));
      if (grad_v) grad_v[gi * n + i] = e.gv;
      gt[i] = e.gt;
      gmul[i] = e.g_mul;
      gscale[i] = e.g_scale;
    }
    if (!grad_max && !grad_x) continue;
    const float g_mv = pol.max_grad(g, sum_lanes8<n>(gmul), sum_lanes8<n>(gscale));
    if (grad_max) grad_max[gi] = __fmul_rn(g_mv, g.m.amax);
    if (grad_x) {
      // NV: upstream takes the maximum before its fp32 cast, so its gradient is added in x's dtype.
      const auto rd = [](float x) { return P::kMaxGradInDtype ? round_to<D>(x) : x; };
      const float g_amax = rd(__fmul_rn(g_mv, factor));
      for (int i = 0; i < n; ++i)
        store_el<D>(grad_x, gi * n + i, __fadd_rn(rd(gt[i]), __fmul_rn(i == g.m.arg ? g_amax : 0.0f, d_sign(t[i]))));
    }
  }
}

Args make_args(const FpQdqView& v, const FpQdqParams& p) {
  return {v.x, v.v, v.max_scale, v.rows * (v.cols / p.group())};
}

// Calls f with the policy of params' family (fp_qdq.cpp with_policy).
template <typename F>
void with_policy(const FpQdqParams& p, F&& f) {
  if (p.nv_fp4) f(Nvfp4Policy{p.global_scale});
  else if (p.nv_e5m3) f(NvE5m3Policy{});
  else f(mx_policy(p.bits));
}

int grid_for(int64_t groups) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, (groups + kThreads - 1) / kThreads)));
}

}  // namespace

void fp_qdq_forward_cuda(const FpQdqView& view, const FpQdqParams& params, void* qdq, float* exponent,
                         uint8_t* codes, uint8_t* scales, void* stream) {
  constexpr const char* site = "fp_qdq_forward_cuda";
  fp_qdq_check(view, params, site);
  const Args a = make_args(view, params);
  if (a.groups == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  with_float_dtype(view.dtype, site, [&](auto d) {
    with_policy(params, [&](auto pol) {
      forward_kernel<decltype(d)::value>
          <<<grid_for(a.groups), kThreads, 0, st>>>(pol, a, qdq, exponent, codes, scales);
    });
  });
  check_launch(site);
}

void fp_qdq_backward_cuda(const FpQdqView& view, const FpQdqParams& params, const void* grad, float* grad_v,
                          float* grad_max, void* grad_x, void* stream) {
  constexpr const char* site = "fp_qdq_backward_cuda";
  fp_qdq_check(view, params, site);
  if (!grad) throw OptionError(std::string("[") + site + "] grad is required");
  const Args a = make_args(view, params);
  if (a.groups == 0) return;
  const auto st = static_cast<cudaStream_t>(stream);
  with_float_dtype(view.dtype, site, [&](auto d) {
    with_policy(params, [&](auto pol) {
      backward_kernel<decltype(d)::value>
          <<<grid_for(a.groups), kThreads, 0, st>>>(pol, a, grad, grad_v, grad_max, grad_x);
    });
  });
  check_launch(site);
}

}  // namespace fastround::tune
