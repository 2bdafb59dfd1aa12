// SignRound's tuning ops on CUDA tensors: the same op bodies as the CPU registration (tune_adapter.h) over
// cpp/fastround/tune/int_qdq_cuda.cu. Every tensor of a call must sit on the weight's (sign-SGD: the first
// parameter's) device; kernels are enqueued on that device's current torch stream, so they order with the
// surrounding torch work and return without waiting. Built only when torch and the toolchain have CUDA
// (FASTROUND_WITH_CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "fastround/tune/fp_qdq_cuda.h"
#include "fastround/tune/int_qdq_cuda.h"
#include "torch_adapter.h"
#include "tune_adapter.h"
#include "tune_fp_adapter.h"

using namespace fastround_torch;

namespace {

// The device's current torch stream (at::cuda::getCurrentCUDAStream is this function; its header would pull in
// cuBLAS's), with that device current while the kernels are enqueued.
struct OnDevice {
  c10::cuda::CUDAGuard guard;
  void* stream;
  explicit OnDevice(const at::Device& d)
      : guard(d), stream(static_cast<void*>(c10::cuda::getCurrentCUDAStream(d.index()).stream())) {}
};

// tune_adapter.h's Kernels policy for CUDA tensors.
struct CudaKernels {
  static at::Device device(const char* op, const char* name, const at::Tensor& t) {
    if (!t.defined() || !t.is_cuda())
      throw fr::OptionError(arg(op, name) + "expected a CUDA tensor, got " +
                            (t.defined() ? t.device().str() : std::string("None")));
    return t.device();
  }

  static void forward(const at::Device& d, const ft::IntQdqView& view, const ft::IntQdqParams& params, void* qdq,
                      float* scale, uint8_t* codes, int32_t* zeros) {
    OnDevice on(d);
    ft::int_qdq_forward_cuda(view, params, qdq, scale, codes, zeros, on.stream);
  }

  static void backward(const at::Device& d, const ft::IntQdqView& view, const ft::IntQdqParams& params,
                       const void* grad, float* grad_v, float* grad_min, float* grad_max) {
    OnDevice on(d);
    ft::int_qdq_backward_cuda(view, params, grad, grad_v, grad_min, grad_max, on.stream);
  }

  static void extremes(const at::Device& d, fr::DType dtype, const void* weight, int64_t rows, int64_t cols,
                       int64_t group, int64_t groups, float* wmin, float* wmax) {
    OnDevice on(d);
    ft::int_group_extremes_cuda(dtype, weight, rows, cols, group, groups, wmin, wmax, on.stream);
  }

  static void sign_sgd(const at::Device& d, const std::vector<ft::SignSgdTensor>& tensors,
                       const ft::SignSgdParams& params) {
    OnDevice on(d);
    ft::sign_sgd_step_cuda(tensors.data(), static_cast<int64_t>(tensors.size()), params, on.stream);
  }

  static void fp_forward(const at::Device& d, const ft::FpQdqView& view, const ft::FpQdqParams& params, void* qdq,
                         float* exponent, uint8_t* codes, uint8_t* scales) {
    OnDevice on(d);
    ft::fp_qdq_forward_cuda(view, params, qdq, exponent, codes, scales, on.stream);
  }

  static void fp_backward(const at::Device& d, const ft::FpQdqView& view, const ft::FpQdqParams& params,
                          const void* grad, float* grad_v, float* grad_max, void* grad_x) {
    OnDevice on(d);
    ft::fp_qdq_backward_cuda(view, params, grad, grad_v, grad_max, grad_x, on.stream);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastround, CUDA, m) {
  register_tune_ops<CudaKernels>(m);
  register_fp_tune_ops<CudaKernels>(m);
}
