// The CUDA twins of int_qdq.cpp and sign_sgd.cpp. Bit-for-bit equality with the CPU kernels rests on four rules:
// every fp32 operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn),
// which nvcc never contracts into an FMA; rintf stands for nearbyint; fp16/bf16 rounding goes through the same
// helpers as the CPU (common/half.h, fp_codes.h, marked __host__ __device__); and a group's gradient sums add
// their terms one after another in element order, as the CPU loop does (fp32 addition is not associative).
// min/max are the CPU's std::min/std::max ternaries, not fminf/fmaxf, so NaN and signed zeros behave alike.
//
// Work split: one warp per group (grid-stride over rows * groups), lanes over the group's columns, so loads and
// stores are coalesced along a row. The backward stages each element's four sum terms in shared memory, kChunk
// elements at a time, and lanes 0..3 each add one of the four sequences in order.
#include "fastround/tune/int_qdq_cuda.h"

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

constexpr int kWarps = 8;  // warps per block; each takes one group at a time
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 256;             // backward: elements a warp stages per pass (shared memory per warp)
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// ---- elements, rounding, min/max as the CPU kernels compute them ----

using cuda::check_launch;
using cuda::load_el;
using cuda::round_to;
using cuda::store_el;
using cuda::with_float_dtype;

__device__ __forceinline__ float std_min(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float std_max(float a, float b) { return a < b ? b : a; }

// ---- a group's scale (int_qdq.cpp's group_scale) ----

struct QdqArgs {
  const void* weight;
  const float* v;
  const float* min_scale;  // null: 1
  const float* max_scale;
  const float* wmin;
  const float* wmax;
  const float* init_scale;  // SignRoundV2: scale = init_scale * max_scale (sym); null: from the extremes
  int64_t rows, cols, group, groups;
  float qmax;       // 2^(b-1) sym, 2^b - 1 asym
  float thr;        // scale_thresh rounded to the scale dtype
  float lo, hi;     // clamp range of the (zero-point shifted) codes
  int32_t zero_sym; // 2^(b-1)
};

struct GroupScale {
  float s, zp, wlo;
  bool passes;
  int branch;
};

template <DType SD, bool SYM>
__device__ __forceinline__ GroupScale group_scale(const QdqArgs& a, int64_t gi) {
  const float smin = a.min_scale ? a.min_scale[gi] : 1.0f;
  const float smax = a.max_scale ? a.max_scale[gi] : 1.0f;
  const float wmin = a.wmin[gi], wmax = a.wmax[gi];
  GroupScale g{0.0f, 0.0f, 0.0f, true, 0};
  if (a.init_scale) {  // int_qdq.cpp's init_group_scale (int_qdq_check allows it for sym only)
    const float pre = round_to<SD>(__fmul_rn(a.init_scale[gi], smax));
    if (pre < 0) {
      g.passes = pre <= -a.thr;
      g.s = std_min(pre, -a.thr);
    } else {
      g.passes = pre >= a.thr;
      g.s = std_max(pre, a.thr);
    }
    return g;
  }
  if constexpr (SYM) {
    const float a_neg = -__fmul_rn(wmin, smin);
    const float a_pos = __fmul_rn(wmax, smax);
    const float m = (a_pos < a_neg) ? a_neg : -a_pos;
    g.branch = a_pos > a_neg ? 1 : (a_pos < a_neg ? -1 : 0);
    const float pre = round_to<SD>(__fdiv_rn(m, a.qmax));
    if (pre < 0) {
      g.passes = pre <= -a.thr;
      g.s = std_min(pre, -a.thr);
    } else {
      g.passes = pre >= a.thr;
      g.s = std_max(pre, a.thr);
    }
  } else {
    g.wlo = __fmul_rn(wmin, smin);
    const float whi = __fmul_rn(wmax, smax);
    const float pre = round_to<SD>(__fdiv_rn(__fsub_rn(whi, g.wlo), a.qmax));
    g.passes = pre >= a.thr;
    g.s = std_max(pre, a.thr);
    g.zp = rintf(__fdiv_rn(-g.wlo, g.s));
  }
  return g;
}

// ---- kernels ----

template <DType W, DType SD, bool SYM>
__global__ void __launch_bounds__(kThreads)
    qdq_forward_kernel(QdqArgs a, void* qdq, float* scale, uint8_t* codes, int32_t* zeros) {
  constexpr bool kWdiv = W == SD && W != DType::F32;  // torch divides two equal 16-bit dtypes in that dtype
  const int lane = threadIdx.x & 31;
  const int64_t total = a.rows * a.groups;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); gi < total;
       gi += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = gi / a.groups, g = gi - r * a.groups;
    const GroupScale gs = group_scale<SD, SYM>(a, gi);
    if (lane == 0) {
      scale[gi] = gs.s;
      if (zeros) zeros[gi] = SYM ? a.zero_sym : static_cast<int32_t>(gs.zp);
    }
    const int64_t c0 = g * a.group, n = min(a.cols, c0 + a.group) - c0;
    const int64_t base = r * a.cols + c0;
    const float* vv = a.v + gi * a.group;
    for (int64_t j = lane; j < n; j += 32) {
      float x = __fdiv_rn(load_el<W>(a.weight, base + j), gs.s);
      if constexpr (kWdiv) x = round_to<W>(x);
      const float rq = rintf(__fadd_rn(x, vv[j]));
      float out, code;
      if constexpr (SYM) {  // + 0.0f: upstream's round_ste gives +0, never -0 (int_qdq.cpp)
        const float q = std_min(std_max(__fadd_rn(rq, 0.0f), a.lo), a.hi);
        out = __fmul_rn(gs.s, q);
        code = __fsub_rn(q, a.lo);
      } else {
        const float q = std_min(std_max(__fadd_rn(rq, gs.zp), a.lo), a.hi);
        out = __fmul_rn(gs.s, __fsub_rn(q, gs.zp));
        code = q;
      }
      store_el<W>(qdq, base + j, out);
      if (codes) codes[base + j] = static_cast<uint8_t>(code);
    }
  }
}

template <DType W, DType SD, bool SYM>
__global__ void __launch_bounds__(kThreads)
    qdq_backward_kernel(QdqArgs a, const void* grad, float* grad_v, float* grad_min, float* grad_max) {
  constexpr bool kWdiv = W == SD && W != DType::F32;
  __shared__ float stage[kWarps][4][kChunk + 1];  // +1: lanes 0..3 read rows in different banks
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float(*st)[kChunk + 1] = stage[warp];
  const int64_t total = a.rows * a.groups;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + warp; gi < total;
       gi += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = gi / a.groups, g = gi - r * a.groups;
    const GroupScale gs = group_scale<SD, SYM>(a, gi);
    const float s = gs.s, zp = SYM ? 0.0f : gs.zp;
    const int64_t c0 = g * a.group, n = min(a.cols, c0 + a.group) - c0;
    const int64_t base = r * a.cols + c0;
    const float* vv = a.v + gi * a.group;
    float* gv = grad_v + gi * a.group;
    float acc = 0.0f;  // lanes 0..3: sum_mul, sum_div, sum_zp_in, sum_zp_out, each in element order
    for (int64_t k0 = 0; k0 < a.group; k0 += kChunk) {
      const int len = static_cast<int>(min(static_cast<int64_t>(kChunk), a.group - k0));
      for (int jj = lane; jj < len; jj += 32) {
        const int64_t j = k0 + jj;
        if (j >= n) {  // padding: its qdq is dropped, so no gradient
          gv[j] = 0.0f;
          continue;
        }
        const float t = load_el<W>(a.weight, base + j);
        const float go = load_el<W>(grad, base + j);
        const float ts = __fdiv_rn(t, s);
        const float x = kWdiv ? round_to<W>(ts) : ts;
        const float u = __fadd_rn(rintf(__fadd_rn(x, vv[j])), zp);
        const bool inside = u >= a.lo && u <= a.hi;
        const float q = std_min(std_max(u, a.lo), a.hi);
        const float gq = __fmul_rn(go, s);
        const float gu = inside ? gq : 0.0f;
        gv[j] = gu;
        st[0][jj] = __fmul_rn(go, __fsub_rn(q, zp));  // fp32 terms: autograd casts the sums, not the terms
        st[1][jj] = __fmul_rn(-gu, __fdiv_rn(ts, s));
        st[2][jj] = gu;
        st[3][jj] = -gq;
      }
      __syncwarp();
      const int64_t m = max(int64_t{0}, min(static_cast<int64_t>(len), n - k0));
      if (lane < 4) {
#pragma unroll 8
        for (int k = 0; k < m; ++k) acc = __fadd_rn(acc, st[lane][k]);  // loads run ahead, the adds stay in order
      }
      __syncwarp();
    }
    const float sum_mul = __shfl_sync(kFullMask, acc, 0);
    const float sum_div = __shfl_sync(kFullMask, acc, 1);
    const float sum_zp = __fadd_rn(__shfl_sync(kFullMask, acc, 2), __shfl_sync(kFullMask, acc, 3));
    if (lane != 0 || (!grad_min && !grad_max)) continue;
    // The scale's gradient, rounded to the scale dtype as torch's autograd does (int_qdq.cpp's backward).
    float g_scale = round_to<SD>(__fadd_rn(round_to<SD>(sum_mul), round_to<SD>(sum_div)));
    float g_wlo = 0.0f;
    if constexpr (!SYM) {
      g_wlo = -__fdiv_rn(sum_zp, s);
      g_scale = round_to<SD>(
          __fadd_rn(g_scale, round_to<SD>(__fmul_rn(-sum_zp, __fdiv_rn(__fdiv_rn(-gs.wlo, s), s)))));
    }
    // int_qdq.cpp's factor_grads
    const float wmin = a.wmin[gi], wmax = a.wmax[gi];
    float g_min, g_max;
    if (a.init_scale) {
      g_min = 0.0f;
      g_max = gs.passes ? __fmul_rn(g_scale, a.init_scale[gi]) : 0.0f;
    } else if constexpr (SYM) {
      const float g_m = gs.passes ? __fdiv_rn(g_scale, a.qmax) : 0.0f;
      const float g_max_ext = __fmul_rn(gs.branch >= 0 ? -1.0f : 1.0f, g_m);
      float g_apos = 0.0f, g_aneg = 0.0f;
      if (gs.branch > 0) g_apos = g_max_ext;
      else if (gs.branch < 0) g_aneg = g_max_ext;
      else g_apos = g_aneg = __fdiv_rn(g_max_ext, 2.0f);
      g_min = __fmul_rn(-g_aneg, wmin);
      g_max = __fmul_rn(g_apos, wmax);
    } else {
      const float g_diff = gs.passes ? __fdiv_rn(g_scale, a.qmax) : 0.0f;
      g_max = __fmul_rn(g_diff, wmax);
      g_min = __fmul_rn(__fsub_rn(g_wlo, g_diff), wmin);
    }
    if (grad_min) grad_min[gi] = g_min;
    if (grad_max) grad_max[gi] = g_max;
  }
}

// min(0, group min) and max(0, group max). NaN never wins a comparison and the partials start at +0, so the
// lanes' partials combine to the CPU's sequential result in any order.
template <DType W>
__global__ void __launch_bounds__(kThreads) extremes_kernel(const void* weight, int64_t rows, int64_t cols,
                                                            int64_t group, int64_t groups, float* wmin, float* wmax) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * groups;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); gi < total;
       gi += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t r = gi / groups, g = gi - r * groups;
    const int64_t c0 = g * group, c1 = min(cols, c0 + group);
    float lo = 0.0f, hi = 0.0f;
    for (int64_t c = c0 + lane; c < c1; c += 32) {
      const float x = load_el<W>(weight, r * cols + c);
      lo = std_min(lo, x);
      hi = std_max(hi, x);
    }
    for (int off = 16; off > 0; off >>= 1) {
      lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    if (lane == 0) {
      wmin[gi] = lo;
      wmax[gi] = hi;
    }
  }
}

// sign_sgd.cpp's step_one over a batch of tensors, each walked grid-stride.
constexpr int kSgdBatch = 48;  // tensors per launch: the batch travels as a kernel parameter (~1.5 KB)

struct SgdBatch {
  float* p[kSgdBatch];
  const float* g[kSgdBatch];
  float* buf[kSgdBatch];
  int64_t n[kSgdBatch];
  int count;
};

// torch.sign on the CPU (and sign_sgd.cpp): sign(NaN) = 0.
__device__ __forceinline__ float sign_of(float d) { return d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f); }

__global__ void __launch_bounds__(kThreads) sign_sgd_kernel(SgdBatch b, SignSgdParams s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int t = 0; t < b.count; ++t) {
    float* p = b.p[t];
    const float* g = b.g[t];
    float* buf = b.buf[t];
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < b.n[t]; i += stride) {
      float d = g[i];
      if (s.momentum != 0) {
        d = s.first ? d : __fadd_rn(__fmul_rn(buf[i], s.momentum), d);
        buf[i] = d;
      }
      float out = __fadd_rn(p[i], __fmul_rn(-s.lr, sign_of(d)));
      if (s.clamp01) out = std_min(std_max(out, 0.0f), s.clamp_hi);
      p[i] = out;
    }
  }
}

// ---- host side ----

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// Calls launch(DTag<weight dtype>, DTag<scale dtype>, bool_constant<sym>) once, then checks the launch.
template <typename F>
void with_qdq_kernel(const IntQdqView& view, const IntQdqParams& params, const char* site, F&& launch) {
  with_float_dtype(view.dtype, site, [&](auto w) {
    with_float_dtype(params.scale_dtype, site, [&](auto sd) {
      with_bool(params.sym, [&](auto sym) { launch(w, sd, sym); });
    });
  });
  check_launch(site);
}

int grid_for(int64_t groups) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, (groups + kWarps - 1) / kWarps)));
}

QdqArgs make_args(const IntQdqView& v, const IntQdqParams& p) {
  QdqArgs a{};
  a.weight = v.weight;
  a.v = v.v;
  a.min_scale = v.min_scale;
  a.max_scale = v.max_scale;
  a.wmin = v.wmin;
  a.wmax = v.wmax;
  a.init_scale = v.init_scale;
  a.rows = v.rows;
  a.cols = v.cols;
  a.group = v.group;
  a.groups = v.groups;
  const float half_range = static_cast<float>(1 << (p.bits - 1));
  const float full_range = static_cast<float>((1 << p.bits) - 1);
  a.qmax = p.sym ? half_range : full_range;
  a.thr = round_to_dtype(p.scale_dtype, p.scale_thresh);
  a.lo = p.sym ? -half_range : 0.0f;
  a.hi = p.sym ? half_range - 1.0f : full_range;
  a.zero_sym = 1 << (p.bits - 1);
  return a;
}

// A qdq kernel's launch: checked arguments, grid and stream.
struct QdqLaunch {
  QdqArgs args;
  int grid;
  cudaStream_t stream;
};

QdqLaunch prepare(const IntQdqView& view, const IntQdqParams& params, void* stream, const char* site) {
  int_qdq_check(view, params, site);
  return {make_args(view, params), grid_for(view.rows * view.groups), static_cast<cudaStream_t>(stream)};
}

}  // namespace

void int_qdq_forward_cuda(const IntQdqView& view, const IntQdqParams& params, void* qdq, float* scale,
                          uint8_t* codes, int32_t* zeros, void* stream) {
  const QdqLaunch l = prepare(view, params, stream, "int_qdq_forward_cuda");
  with_qdq_kernel(view, params, "int_qdq_forward_cuda", [&](auto w, auto sd, auto sym) {
    qdq_forward_kernel<decltype(w)::value, decltype(sd)::value, decltype(sym)::value>
        <<<l.grid, kThreads, 0, l.stream>>>(l.args, qdq, scale, codes, zeros);
  });
}

void int_qdq_backward_cuda(const IntQdqView& view, const IntQdqParams& params, const void* grad, float* grad_v,
                           float* grad_min, float* grad_max, void* stream) {
  if (!grad || !grad_v) throw OptionError("[int_qdq_backward_cuda] grad and grad_v are required");
  const QdqLaunch l = prepare(view, params, stream, "int_qdq_backward_cuda");
  with_qdq_kernel(view, params, "int_qdq_backward_cuda", [&](auto w, auto sd, auto sym) {
    qdq_backward_kernel<decltype(w)::value, decltype(sd)::value, decltype(sym)::value>
        <<<l.grid, kThreads, 0, l.stream>>>(l.args, grad, grad_v, grad_min, grad_max);
  });
}

void int_group_extremes_cuda(DType dtype, const void* weight, int64_t rows, int64_t cols, int64_t group,
                             int64_t groups, float* wmin, float* wmax, void* stream) {
  constexpr const char* site = "int_group_extremes_cuda";
  if (!weight || !wmin || !wmax) throw OptionError(std::string("[") + site + "] weight, wmin and wmax are required");
  if (rows <= 0 || group <= 0 || groups <= 0 || group * groups < cols)
    throw OptionError(std::string("[") + site + "] group layout does not cover the columns");
  const auto st = static_cast<cudaStream_t>(stream);
  with_float_dtype(dtype, site, [&](auto w) {
    extremes_kernel<decltype(w)::value><<<grid_for(rows * groups), kThreads, 0, st>>>(weight, rows, cols, group,
                                                                                     groups, wmin, wmax);
  });
  check_launch(site);
}

void sign_sgd_step_cuda(const SignSgdTensor* tensors, int64_t count, const SignSgdParams& params, void* stream) {
  constexpr const char* site = "sign_sgd_step_cuda";
  if (count > 0 && !tensors) throw OptionError(std::string("[") + site + "] no tensor list");
  for (int64_t i = 0; i < count; ++i)
    sign_sgd_check(tensors[i].p, tensors[i].g, tensors[i].buf, tensors[i].n, params, site);
  const auto st = static_cast<cudaStream_t>(stream);
  for (int64_t first = 0; first < count; first += kSgdBatch) {
    SgdBatch b{};
    int64_t most = 0;
    for (int64_t i = first; i < std::min(count, first + kSgdBatch); ++i) {
      const SignSgdTensor& t = tensors[i];
      if (t.n <= 0) continue;
      b.p[b.count] = t.p;
      b.g[b.count] = t.g;
      b.buf[b.count] = t.buf;
      b.n[b.count] = t.n;
      ++b.count;
      most = std::max(most, t.n);
    }
    if (b.count == 0) continue;
    const int grid = static_cast<int>(std::min<int64_t>(4096, (most + kThreads - 1) / kThreads));
    sign_sgd_kernel<<<grid, kThreads, 0, st>>>(b, params);
    check_launch(site);
  }
}

}  // namespace fastround::tune
