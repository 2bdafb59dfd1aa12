// The CUDA twin of fp_qdq.cpp. Bit-for-bit equality with the CPU kernels rests on the rules of int_qdq_cuda.cu:
// every fp32 operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn),
// never contracted into an FMA; floor / log2 / 2^k are computed as fp_numerics.h does (exponent bits, the double
// log2 only near a binade's top); min/max/clamp are the CPU's ternaries; fp16/bf16 rounding goes through
// common/half.h. A group's two scale-gradient sums keep torch's 8-lane order, as the CPU kernel does.
//
// Work split: one thread per group (32 elements MXFP, 16 NVFP4_E5M3; grid-stride), which runs the CPU's group code
// unchanged; a 4096 x 4096 MXFP weight is 512K threads.
#include "fastround/tune/fp_qdq_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastround/common/convert.h"
#include "fastround/tune/cuda_elements.cuh"
#include "fastround/common/error.h"

namespace fastround::tune {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int G = static_cast<int>(kMxGroup);
constexpr float kLn2 = static_cast<float>(0.6931471805599453);

using cuda::load_el;
using cuda::round_to;
using cuda::store_el;

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

struct Fmt {
  float emax, max_norm, min_p, mscale;
};

__device__ __forceinline__ Fmt fmt_of(int bits) {
  return bits == 4 ? Fmt{2.0f, 6.0f, 0.0f, 2.0f} : Fmt{8.0f, 448.0f, -6.0f, 8.0f};
}

struct GroupExp {
  float amax, mv, e, s;
  int arg;
  bool passes;
};

__device__ __forceinline__ GroupExp group_exp(const float* t, float factor, const Fmt& F) {
  GroupExp g;
  g.amax = d_abs(t[0]);
  g.arg = 0;
  for (int i = 1; i < G; ++i) {
    const float a = d_abs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = __fmul_rn(g.amax, factor);
  const float e0 = g.mv == 0.0f ? 1.0f : d_floor_log2(g.mv);
  const float d = __fsub_rn(e0, F.emax);
  g.passes = d >= -127.0f && d <= 127.0f;
  g.e = d_clamp(d, -127.0f, 127.0f);
  g.s = d_pow2(g.e);
  return g;
}

struct Elem {
  float x1, x2, a0, p1, q2, y, z0, z, out;
};

__device__ __forceinline__ Elem mx_elem(float t, float v, float s, const Fmt& F) {
  Elem r;
  r.x1 = __fadd_rn(__fdiv_rn(t, s), v);
  r.x2 = d_clamp(r.x1, -F.max_norm, F.max_norm);
  r.a0 = __fadd_rn(d_abs(r.x2), r.x2 == 0.0f ? 1.0f : 0.0f);
  r.p1 = d_floor_log2(r.a0);
  r.q2 = d_pow2(d_max(r.p1, F.min_p));
  r.y = __fmul_rn(__fdiv_rn(r.x2, r.q2), F.mscale);
  const float ay = d_abs(r.y);
  const float h = __fsub_rn(ay, 0.5f);
  const float mask = (h >= 0.0f && d_floor_nonneg(h) == h && (static_cast<int32_t>(h) & 1) == 0) ? 1.0f : 0.0f;
  const float rnd = __fmul_rn(d_sign(r.y), __fsub_rn(d_floor_nonneg(__fadd_rn(ay, 0.5f)), mask));
  r.z0 = __fdiv_rn(rnd, F.mscale);
  r.z = __fmul_rn(r.z0, r.q2);
  r.out = d_clamp(r.z, -F.max_norm, F.max_norm);
  return r;
}

// torch's fp32 sum of 32 contiguous values: 8 lanes, then the lanes in order (fp_numerics.h torch_sum_lanes8).
__device__ __forceinline__ float sum_lanes8(const float* v) {
  float lanes[8];
  for (int l = 0; l < 8; ++l) {
    float a = v[l];
    for (int k = 1; k < 4; ++k) a = __fadd_rn(a, v[8 * k + l]);
    lanes[l] = a;
  }
  float acc = 0.0f;
  for (int l = 0; l < 8; ++l) acc = __fadd_rn(acc, lanes[l]);
  return acc;
}

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

constexpr int GN = static_cast<int>(kNvGroup);
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

// torch's fp32 sum of 16 contiguous values (fp_numerics.h torch_sum_lanes8<16>).
__device__ __forceinline__ float sum_lanes8_16(const float* v) {
  float acc = 0.0f;
  for (int l = 0; l < 8; ++l) acc = __fadd_rn(acc, __fadd_rn(__fadd_rn(0.0f, v[l]), v[8 + l]));
  return acc;
}

struct NvGroup {
  float amax, mv, sc0, d;
  int arg;
  uint8_t byte;
};

__device__ __forceinline__ NvGroup nv_group_scale(const float* t, float factor) {
  NvGroup g;
  g.amax = d_abs(t[0]);
  g.arg = 0;
  for (int i = 1; i < GN; ++i) {
    const float a = d_abs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = __fmul_rn(g.amax, factor);
  g.sc0 = __fmul_rn(1.0f, __fmul_rn(g.mv, kOneSixth));
  const float sc1 = d_clamp(g.sc0, 0.0f, kUe5m3Max);
  g.byte = d_ue5m3_encode(sc1);
  g.d = __fadd_rn(__fsub_rn(d_ue5m3_decode(g.byte), sc1), sc1);
  return g;
}

struct NvElem {
  float sx, f;
};

__device__ __forceinline__ NvElem nv_elem(float t, float v, float d) {
  NvElem e;
  e.sx = __fadd_rn(d == 0.0f ? 0.0f : __fdiv_rn(t, d), v);
  e.f = d_cast_to_fp4(d_clamp(e.sx, -6.0f, 6.0f));
  return e;
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

struct Nv4Group {
  float amax, mv, sc0, s, dq, os, r;
  int arg;
  uint8_t byte;
};

__device__ __forceinline__ Nv4Group nv4_group_scale(const float* t, float factor, float gs) {
  Nv4Group g;
  g.amax = d_abs(t[0]);
  g.arg = 0;
  for (int i = 1; i < GN; ++i) {
    const float a = d_abs(t[i]);
    if (a > g.amax) {
      g.amax = a;
      g.arg = i;
    }
  }
  g.mv = __fmul_rn(g.amax, factor);
  g.sc0 = __fmul_rn(gs, __fmul_rn(g.mv, kOneSixth));
  const float sc1 = d_clamp(g.sc0, -448.0f, 448.0f);
  g.s = __fadd_rn(__fsub_rn(d_e4m3_decode(d_e4m3_code(sc1)), sc1), sc1);
  g.byte = d_e4m3_code(g.s);
  g.dq = __fmul_rn(g.s, d_recip0(gs));
  g.os = d_recip0(g.dq);
  g.r = d_recip0(g.os);
  return g;
}

__device__ __forceinline__ NvElem nv4_elem(float t, float v, float os) {
  NvElem e;
  e.sx = __fadd_rn(__fmul_rn(t, os), v);
  e.f = d_cast_to_fp4(d_clamp(e.sx, -6.0f, 6.0f));
  return e;
}

// fp_qdq.cpp reciprocal_backward: -g * (1/a)^2 with g masked where a is 0 (NaN there, as autograd).
__device__ __forceinline__ float d_reciprocal_backward(float a, float g) {
  const float masked = a == 0.0f ? 0.0f : __fmul_rn(g, 1.0f);
  const float rr = __fdiv_rn(1.0f, a);
  return __fmul_rn(-masked, __fmul_rn(rr, rr));
}

struct Args {
  const void* x;
  const float* v;
  const float* max_scale;
  int64_t groups;
  int bits;
  bool nv;  // NVFP4_E5M3: groups of 16
  bool nv4;  // NVFP4: groups of 16 under global_scale
  float global_scale;
};

template <DType D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Args a, void* qdq, float* exponent, uint8_t* codes, uint8_t* scales) {
  const Fmt F = fmt_of(a.bits);
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < a.groups;
       gi += static_cast<int64_t>(gridDim.x) * kThreads) {
    float t[G];
    if (a.nv4) {
      for (int i = 0; i < GN; ++i) t[i] = load_el<D>(a.x, gi * GN + i);
      const Nv4Group g = nv4_group_scale(t, a.max_scale ? a.max_scale[gi] : 1.0f, a.global_scale);
      exponent[gi] = g.s;
      if (scales) scales[gi] = g.byte;
      for (int i = 0; i < GN; ++i) {
        const float q = __fmul_rn(nv4_elem(t[i], a.v ? a.v[gi * GN + i] : 0.0f, g.os).f, g.r);
        store_el<D>(qdq, gi * GN + i, q);
        if (codes)
          codes[gi * GN + i] = d_e2m1_code(d_cast_to_fp4(d_clamp(__fmul_rn(round_to<D>(q), g.os), -6.0f, 6.0f)));
      }
      continue;
    }
    if (a.nv) {
      for (int i = 0; i < GN; ++i) t[i] = load_el<D>(a.x, gi * GN + i);
      const NvGroup g = nv_group_scale(t, a.max_scale ? a.max_scale[gi] : 1.0f);
      exponent[gi] = g.d;
      if (scales) scales[gi] = g.byte;
      for (int i = 0; i < GN; ++i) {
        const float q = __fmul_rn(nv_elem(t[i], a.v ? a.v[gi * GN + i] : 0.0f, g.d).f, g.d);
        store_el<D>(qdq, gi * GN + i, q);
        if (codes) codes[gi * GN + i] = d_nv_code(round_to<D>(q), g.d);
      }
      continue;
    }
    for (int i = 0; i < G; ++i) t[i] = load_el<D>(a.x, gi * G + i);
    const GroupExp g = group_exp(t, a.max_scale ? a.max_scale[gi] : 1.0f, F);
    exponent[gi] = g.e;
    if (scales) scales[gi] = static_cast<uint8_t>(__fadd_rn(g.e, 127.0f));
    for (int i = 0; i < G; ++i) {
      const float q = __fmul_rn(mx_elem(t[i], a.v ? a.v[gi * G + i] : 0.0f, g.s, F).out, g.s);
      store_el<D>(qdq, gi * G + i, q);
      if (codes) {
        const float c = __fdiv_rn(round_to<D>(q), g.s);
        codes[gi * G + i] = a.bits == 4 ? d_e2m1_code(c) : d_e4m3_code(c);
      }
    }
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Args a, const void* grad, float* grad_v, float* grad_max, void* grad_x) {
  const Fmt F = fmt_of(a.bits);
  const float mn = F.max_norm;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gi < a.groups;
       gi += static_cast<int64_t>(gridDim.x) * kThreads) {
    float t[G], gmul[G], gdiv[G], gt[G];
    const float factor = a.max_scale ? a.max_scale[gi] : 1.0f;
    if (a.nv4) {
      for (int i = 0; i < GN; ++i) t[i] = load_el<D>(a.x, gi * GN + i);
      const float gs = a.global_scale;
      const Nv4Group g = nv4_group_scale(t, factor, gs);
      for (int i = 0; i < GN; ++i) {
        const float go = load_el<D>(grad, gi * GN + i);
        const NvElem e = nv4_elem(t[i], a.v ? a.v[gi * GN + i] : 0.0f, g.os);
        const float cx = d_clamp(e.sx, -6.0f, 6.0f);
        const float sgn = d_sign(cx);
        const float ab = d_abs(cx);
        const float g_r2 = __fmul_rn(__fmul_rn(go, g.r), sgn);
        const float g_r = inside(d_abs(e.f), 6.0f) ? g_r2 : 0.0f;
        float g_a;
        if (ab < 2.0f) g_a = __fmul_rn(__fdiv_rn(g_r, 2.0f), 2.0f);
        else if (ab < 4.0f) g_a = g_r;
        else g_a = __fdiv_rn(__fmul_rn(g_r, 2.0f), 2.0f);
        const float g_cx = __fadd_rn(__fmul_rn(g_a, sgn), 0.0f);
        const float g_sx = inside(e.sx, 6.0f) ? g_cx : 0.0f;
        if (grad_v) grad_v[gi * GN + i] = g_sx;
        gt[i] = __fmul_rn(g_sx, g.os);
        gdiv[i] = __fmul_rn(g_sx, t[i]);  // the element scale's terms
        gmul[i] = __fmul_rn(go, e.f);
      }
      if (!grad_max && !grad_x) continue;
      const float g_rsum = sum_lanes8_16(gmul);
      const float g_os = __fadd_rn(sum_lanes8_16(gdiv), d_reciprocal_backward(g.os, g_rsum));
      const float g_dq = d_reciprocal_backward(g.dq, g_os);
      const float g_s = __fmul_rn(g_dq, d_recip0(gs));
      const float g_sc0 = inside(g.sc0, 448.0f) ? g_s : 0.0f;
      const float g_mv = __fmul_rn(__fmul_rn(g_sc0, gs), kOneSixth);
      if (grad_max) grad_max[gi] = __fmul_rn(g_mv, g.amax);
      if (grad_x) {
        const float g_amax = round_to<D>(__fmul_rn(g_mv, factor));
        for (int i = 0; i < GN; ++i)
          store_el<D>(grad_x, gi * GN + i,
                      __fadd_rn(round_to<D>(gt[i]), __fmul_rn(i == g.arg ? g_amax : 0.0f, d_sign(t[i]))));
      }
      continue;
    }
    if (a.nv) {
      for (int i = 0; i < GN; ++i) t[i] = load_el<D>(a.x, gi * GN + i);
      const NvGroup g = nv_group_scale(t, factor);
      const float d = g.d;
      for (int i = 0; i < GN; ++i) {
        const float go = load_el<D>(grad, gi * GN + i);
        const NvElem e = nv_elem(t[i], a.v ? a.v[gi * GN + i] : 0.0f, d);
        const float cx = d_clamp(e.sx, -6.0f, 6.0f);
        const float sgn = d_sign(cx);
        const float ab = d_abs(cx);
        const float g_r2 = __fmul_rn(__fmul_rn(go, d), sgn);
        const float g_r = inside(d_abs(e.f), 6.0f) ? g_r2 : 0.0f;
        float g_a;
        if (ab < 2.0f) g_a = __fmul_rn(__fdiv_rn(g_r, 2.0f), 2.0f);
        else if (ab < 4.0f) g_a = g_r;
        else g_a = __fdiv_rn(__fmul_rn(g_r, 2.0f), 2.0f);
        const float g_cx = __fadd_rn(__fmul_rn(g_a, sgn), 0.0f);
        const float g_sx = inside(e.sx, 6.0f) ? g_cx : 0.0f;
        if (grad_v) grad_v[gi * GN + i] = g_sx;
        const float g_div = d == 0.0f ? 0.0f : g_sx;
        gt[i] = __fdiv_rn(g_div, d);
        gdiv[i] = __fmul_rn(-g_div, __fdiv_rn(__fdiv_rn(t[i], d), d));
        gmul[i] = __fmul_rn(go, e.f);
      }
      if (!grad_max && !grad_x) continue;
      const float g_d = __fadd_rn(sum_lanes8_16(gmul), sum_lanes8_16(gdiv));
      const float g_sc0 = (g.sc0 >= 0.0f && g.sc0 <= kUe5m3Max) ? __fmul_rn(g_d, 1.0f) : 0.0f;
      const float g_mv = __fmul_rn(__fmul_rn(g_sc0, 1.0f), kOneSixth);
      if (grad_max) grad_max[gi] = __fmul_rn(g_mv, g.amax);
      if (grad_x) {
        const float g_amax = round_to<D>(__fmul_rn(g_mv, factor));
        for (int i = 0; i < GN; ++i)
          store_el<D>(grad_x, gi * GN + i,
                      __fadd_rn(round_to<D>(gt[i]), __fmul_rn(i == g.arg ? g_amax : 0.0f, d_sign(t[i]))));
      }
      continue;
    }
    for (int i = 0; i < G; ++i) t[i] = load_el<D>(a.x, gi * G + i);
    const GroupExp g = group_exp(t, factor, F);
    const float s = g.s;
    for (int i = 0; i < G; ++i) {
      const float go = load_el<D>(grad, gi * G + i);
      const Elem e = mx_elem(t[i], a.v ? a.v[gi * G + i] : 0.0f, s, F);
      const float g_out = __fmul_rn(go, s);
      const float g_z = inside(e.z, mn) ? g_out : 0.0f;
      const float g_z0 = __fmul_rn(g_z, e.q2);
      const float g_q2b = __fmul_rn(g_z, e.z0);
      const float g_r = __fdiv_rn(g_z0, F.mscale);
      const float sy = d_sign(e.y);
      const float g_ay = __fmul_rn(g_r, sy);
      const float g_y = __fadd_rn(__fmul_rn(g_ay, sy), 0.0f);
      const float g_y0 = __fmul_rn(g_y, F.mscale);
      const float g_x2d = __fdiv_rn(g_y0, e.q2);
      const float g_q2 = __fmul_rn(-g_y0, __fdiv_rn(__fdiv_rn(e.x2, e.q2), e.q2));
      const float ql = __fmul_rn(e.q2, kLn2);
      const float g_p = __fadd_rn(__fmul_rn(g_q2, ql), __fmul_rn(g_q2b, ql));
      const float g_p1 = e.p1 >= F.min_p ? g_p : 0.0f;
      const float g_a0 = __fdiv_rn(g_p1, __fmul_rn(e.a0, kLn2));
      const float g_x2 = __fadd_rn(g_x2d, __fmul_rn(g_a0, d_sign(e.x2)));
      const float g_x1 = inside(e.x1, mn) ? g_x2 : 0.0f;
      if (grad_v) grad_v[gi * G + i] = g_x1;
      gt[i] = __fdiv_rn(g_x1, s);
      gdiv[i] = __fmul_rn(-g_x1, __fdiv_rn(__fdiv_rn(t[i], s), s));
      gmul[i] = __fmul_rn(go, e.out);
    }
    if (!grad_max && !grad_x) continue;
    const float g_s = __fadd_rn(sum_lanes8(gmul), sum_lanes8(gdiv));
    const float g_e = g.passes ? __fmul_rn(g_s, __fmul_rn(s, kLn2)) : 0.0f;
    const float g_log = g.mv == 0.0f ? 0.0f : g_e;
    const float g_mv = __fdiv_rn(g_log, __fmul_rn(g.mv, kLn2));
    if (grad_max) grad_max[gi] = __fmul_rn(g_mv, g.amax);
    if (grad_x) {
      const float g_amax = __fmul_rn(g_mv, factor);
      for (int i = 0; i < G; ++i)
        store_el<D>(grad_x, gi * G + i, __fadd_rn(gt[i], __fmul_rn(i == g.arg ? g_amax : 0.0f, d_sign(t[i]))));
    }
  }
}

template <DType D>
using DTag = std::integral_constant<DType, D>;

template <typename F>
void with_float_dtype(DType d, const char* site, F&& f) {
  switch (d) {
    case DType::F32: f(DTag<DType::F32>{}); return;
    case DType::F16: f(DTag<DType::F16>{}); return;
    case DType::BF16: f(DTag<DType::BF16>{}); return;
    default:
      throw OptionError(std::string("[") + site + "] dtype must be F32, F16 or BF16, got " +
                        std::string(dtype_name(d)));
  }
}

void check_launch(const char* site) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("[") + site + "] CUDA launch failed: " + cudaGetErrorString(e));
}

Args make_args(const FpQdqView& v, const FpQdqParams& p) {
  return {v.x, v.v, v.max_scale, v.rows * (v.cols / p.group()), p.bits, p.nv_e5m3, p.nv_fp4, p.global_scale};
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
    forward_kernel<decltype(d)::value><<<grid_for(a.groups), kThreads, 0, st>>>(a, qdq, exponent, codes, scales);
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
    backward_kernel<decltype(d)::value>
        <<<grid_for(a.groups), kThreads, 0, st>>>(a, grad, grad_v, grad_max, grad_x);
  });
  check_launch(site);
}

}  // namespace fastround::tune
