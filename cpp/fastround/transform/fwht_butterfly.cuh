// The Sylvester butterflies of fwht_cuda.cu as device helpers, shared with the kernels that rotate their input
// while loading it (infer/woq_cuda.cu's staged GEMV), so that both compute the same bits: every butterfly one
// correctly rounded add or subtract, never contracted into an FMA (fwht.h's bit-for-bit contract), strides in
// increasing order.
// Layout: a thread holds 8 consecutive elements of its row in v[0..8); consecutive lanes of a warp hold consecutive
// groups of 8, so data stride 8·w is lane stride w.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastround::transform::gpu {

inline constexpr int kShuffleTop = 128;  // largest stride done by warp shuffles: 32 lanes x 8 elements = 256

__device__ __forceinline__ float radd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double radd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rsub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rmul(double a, double b) { return __dmul_rn(a, b); }

// Butterfly stages with register strides 1, 2, ..., R/2 over v[0..R) (strides h·1, h·2, ... of the data), in
// increasing order, stopping at `limit` (the Sylvester length in these units).
template <int R, typename C>
__device__ __forceinline__ void radix(C v[], int limit) {
#pragma unroll
  for (int w = 1; w < R; w *= 2) {
    if (w >= limit) break;
#pragma unroll
    for (int j = 0; j < R; ++j)
      if ((j & w) == 0) {
        const C a = v[j], b = v[j + w];
        v[j] = radd(a, b);
        v[j + w] = rsub(a, b);
      }
  }
}

// The stages of data strides 8 .. min(len/2, kShuffleTop) across the warp, after radix<8>(v, len): the lane whose
// bit w is set holds the upper operand b and keeps a - b. Every lane of the warp must call it (full-mask shuffles).
template <typename C>
__device__ __forceinline__ void shuffle_stages(C (&v)[8], int len, int lane) {
  for (int w = 1; 8 * w < len && w <= kShuffleTop / 8; w *= 2) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const C o = __shfl_xor_sync(0xffffffffu, v[j], w);
      v[j] = (lane & w) ? rsub(o, v[j]) : radd(v[j], o);
    }
  }
}

template <typename C>
__device__ __forceinline__ C apply_sign(C v, int8_t s) {
  return s > 0 ? v : -v;
}

// The normalization factor 1/sqrt(n) in the compute type C, rounded once from double.
template <typename C>
inline C fwht_scale(int64_t n) {
  return static_cast<C>(1.0 / std::sqrt(static_cast<double>(n)));
}

}  // namespace fastround::transform::gpu
