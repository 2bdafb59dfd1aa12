// Device-side element access of the tuning kernels (int_qdq_cuda.cu, fp_qdq_cuda.cu): loads, stores and dtype
// rounding done with common/convert.h's conversions, so every CUDA kernel rounds exactly as the CPU kernels do.
#pragma once

#include <cstdint>

#include "fastround/common/convert.h"
#include "fastround/common/dtype.h"

namespace fastround::tune::cuda {

template <DType D>
__device__ __forceinline__ float load_el(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == DType::BF16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  else return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
}

template <DType D>
__device__ __forceinline__ void store_el(void* p, int64_t i, float x) {
  if constexpr (D == DType::F32) static_cast<float*>(p)[i] = x;
  else if constexpr (D == DType::BF16) static_cast<uint16_t*>(p)[i] = float_to_bf16(x);
  else static_cast<uint16_t*>(p)[i] = float_to_fp16(x);
}

// round_to_dtype of common/convert.h
template <DType D>
__device__ __forceinline__ float round_to(float x) {
  if constexpr (D == DType::BF16) return bf16_to_float(float_to_bf16(x));
  else if constexpr (D == DType::F16) return fp16_to_float(float_to_fp16(x));
  else return x;
}

}  // namespace fastround::tune::cuda
