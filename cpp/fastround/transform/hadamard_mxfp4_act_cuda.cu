#include "fastround/transform/hadamard_mxfp4_act_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/transform/hadamard_mxfp4_act.h"

namespace fastround::transform::gpu {

namespace {

constexpr int kThreads = 256;

// Storage types: exact widening, RNE narrowing through the CPU's half.h / fp_codes.h functions.
struct F32 {
  using T = float;
  __device__ static float in(float v) { return v; }
  __device__ static float out(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  __device__ static float in(uint16_t v) { return fp16_to_float(v); }
  __device__ static uint16_t out(float v) { return float_to_fp16(v); }
};
struct BF16 {
  using T = uint16_t;
  __device__ static float in(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t out(float v) { return float_to_bf16(v); }
};

struct Params {
  const void* x;
  void* y;
  int64_t total;        // rows * cols, a multiple of 32
  int n;                // rotation block, a power of two <= 32
  int k, len;           // n = k · len, len a power of two
  const int8_t* hadk;   // [k, k] device (k > 1), or null
  const int8_t* signs;  // [n] device, or null
  bool transpose, signs_first, normalize;
  float c;              // 1/sqrt(n) rounded to the input dtype
};

__device__ __forceinline__ float apply_sign(const int8_t* signs, int j, float v) { return signs[j] > 0 ? v : -v; }

// Element i = global thread index: lane i % 32 of group i / 32 (blockDim is a multiple of 32 and total of 32, so a
// warp is always one whole group, every lane active).
template <typename IO>
__global__ void __launch_bounds__(kThreads) hadamard_mxfp4_act_kernel(const Params p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x & 31;
  const int j = lane & (p.n - 1);  // index inside the rotation block (n | 32 | cols)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.total; i += stride) {
    float v = IO::in(static_cast<const typename IO::T*>(p.x)[i]);
    if (p.signs && p.signs_first) v = apply_sign(p.signs, j, v);
    for (int h = 1; h < p.len; h *= 2) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, v, h);
      v = (j & h) ? __fsub_rn(other, v) : __fadd_rn(v, other);  // lower: a + b; upper: a - b, a the lower's
    }
    if (p.k > 1) {  // element j = kk · len + r: out = sum over k' in increasing order, from 0, of ±y[k' · len + r]
      const int kk = j / p.len, r = j % p.len, base = lane - j;
      float acc = 0.0f;
      for (int kp = 0; kp < p.k; ++kp) {
        const float y = __shfl_sync(0xFFFFFFFFu, v, base + kp * p.len + r);
        const bool positive = (p.transpose ? p.hadk[kp * p.k + kk] : p.hadk[kk * p.k + kp]) > 0;
        acc = positive ? __fadd_rn(acc, y) : __fsub_rn(acc, y);
      }
      v = acc;
    }
    if (p.normalize) v = __fmul_rn(v, p.c);
    if (p.signs && !p.signs_first) v = apply_sign(p.signs, j, v);
    const float a = fabsf(v);
    float amax = a > 0.0f ? a : 0.0f;  // NaN never wins, as on the CPU
    for (int h = 16; h >= 1; h /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, h));
    const float s = mxfp4_act_scale(amax);
    static_cast<typename IO::T*>(p.y)[i] = IO::out(mxfp4_act_qdq(v, s));
  }
}

void check_launch(const char* site, cudaError_t e) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("[") + site + "] CUDA launch failed: " + cudaGetErrorString(e));
}

template <typename IO>
void launch(const Params& p, void* stream, const char* site) {
  const int64_t blocks = std::min<int64_t>((p.total + kThreads - 1) / kThreads, int64_t(1) << 20);
  hadamard_mxfp4_act_kernel<IO><<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch(site, cudaGetLastError());
}

}  // namespace

bool hadamard_mxfp4_act_cuda_supports(const FwhtSpec& spec) {
  return spec.n > 0 && spec.n <= kMxfp4ActGroup && (spec.n & (spec.n - 1)) == 0 && spec.k > 0 &&
         spec.n % spec.k == 0 && ((spec.n / spec.k) & (spec.n / spec.k - 1)) == 0 && (spec.k == 1 || spec.hadk);
}

void hadamard_mxfp4_act_rows_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t cols,
                                  const FwhtSpec& spec, void* stream, const char* site) {
  const std::string at = std::string("[") + site + "] ";
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw OptionError(at + "x: dtype must be F32, F16 or BF16, got " + std::string(dtype_name(dtype)));
  if (rows < 0 || cols < 0) throw OptionError(at + "x: negative shape");
  if (cols % kMxfp4ActGroup != 0)
    throw OptionError(at + "x: the last dimension " + std::to_string(cols) + " is not a multiple of the MXFP4 " +
                      "activation group 32");
  if (!hadamard_mxfp4_act_cuda_supports(spec))
    throw OptionError(at + "block_size: the CUDA kernel takes power-of-two blocks up to 32 (K · 2^m, K's matrix " +
                      "given when K > 1), got " + std::to_string(spec.n) + " with K = " + std::to_string(spec.k));
  if (rows * cols == 0) return;
  if (!x || !y) throw OptionError(at + "x / y: null data");
  Params p{x, y, rows * cols, static_cast<int>(spec.n), static_cast<int>(spec.k), static_cast<int>(spec.n / spec.k),
           spec.k > 1 ? spec.hadk : nullptr, spec.signs, spec.transpose, spec.signs_first, spec.normalize,
           hadamard_norm_in(dtype, spec.n)};
  switch (dtype) {
    case DType::F32: return launch<F32>(p, stream, site);
    case DType::F16: return launch<F16>(p, stream, site);
    default: return launch<BF16>(p, stream, site);
  }
}

}  // namespace fastround::transform::gpu
