// Host-side launch helpers of the tuning kernels (int_qdq_cuda.cu, fp_qdq_cuda.cu): the dtype dispatch to a
// kernel's template argument and the launch check, each throwing with the call's site named.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastround/common/dtype.h"
#include "fastround/common/error.h"

namespace fastround::tune::cuda {

template <DType D>
using DTag = std::integral_constant<DType, D>;

// Calls f(DTag<d>) for a float dtype (the kernels' template argument).
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

// Launches only enqueue: a bad configuration shows here, a fault in the kernel on the stream's next sync.
inline void check_launch(const char* site) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("[") + site + "] CUDA launch failed: " + cudaGetErrorString(e));
}

}  // namespace fastround::tune::cuda
