// SignRound's tuning ops on CPU tensors (torch.ops.fastround.int_qdq*, sign_sgd_step_): the op schemas and their
// CPU implementations over cpp/fastround/tune. The op bodies are tune_adapter.h's, shared with the CUDA
// registration (bind_tune_cuda.cpp); autograd and fake kernels are registered in python/fastround/tune_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "fastround/common/nonfinite.h"
#include "fastround/quant/codes.h"
#include "fastround/quant/int_opt_rtn.h"
#include "fastround/tune/fp_qdq.h"
#include "fastround/tune/int_qdq.h"
#include "fastround/tune/sign_sgd.h"
#include "torch_adapter.h"
#include "tune_adapter.h"
#include "tune_fp_adapter.h"

using namespace fastround_torch;

namespace {

// tune_adapter.h's Kernels policy for CPU tensors: the core's OpenMP kernels, run without the GIL.
struct CpuKernels {
  static at::Device device(const char*, const char*, const at::Tensor&) { return at::Device(at::kCPU); }

  static void forward(const at::Device&, const ft::IntQdqView& view, const ft::IntQdqParams& params, void* qdq,
                      float* scale, uint8_t* codes, int32_t* zeros) {
    GilFree nogil;
    ft::int_qdq_forward(view, params, qdq, scale, codes, zeros);
  }

  static void backward(const at::Device&, const ft::IntQdqView& view, const ft::IntQdqParams& params,
                       const void* grad, float* grad_v, float* grad_min, float* grad_max) {
    GilFree nogil;
    ft::int_qdq_backward(view, params, grad, grad_v, grad_min, grad_max);
  }

  static void extremes(const at::Device&, fr::DType dtype, const void* weight, int64_t rows, int64_t cols,
                       int64_t group, int64_t groups, float* wmin, float* wmax) {
    GilFree nogil;
    ft::int_group_extremes(dtype, weight, rows, cols, group, groups, wmin, wmax);
  }

  static void sign_sgd(const at::Device&, const std::vector<ft::SignSgdTensor>& tensors,
                       const ft::SignSgdParams& params) {
    GilFree nogil;
    for (const ft::SignSgdTensor& t : tensors) ft::sign_sgd_step(t.p, t.g, t.buf, t.n, params);
  }

  static void fp_forward(const at::Device&, const ft::FpQdqView& view, const ft::FpQdqParams& params, void* qdq,
                         float* exponent, uint8_t* codes, uint8_t* scales) {
    GilFree nogil;
    ft::fp_qdq_forward(view, params, qdq, exponent, codes, scales);
  }

  static void fp_backward(const at::Device&, const ft::FpQdqView& view, const ft::FpQdqParams& params,
                          const void* grad, float* grad_v, float* grad_max, void* grad_x) {
    GilFree nogil;
    ft::fp_qdq_backward(view, params, grad, grad_v, grad_max, grad_x);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastround, m) {
  // init_scale (SignRoundV2, appended with a default so earlier callers stay valid): [rows, groups] fp32.
  m.def("int_qdq(Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, Tensor wmax, int bits, "
        "int group_size, bool sym, ScalarType scale_dtype, float scale_thresh, Tensor? init_scale=None) "
        "-> (Tensor, Tensor)");
  m.def("int_qdq_codes(Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, Tensor wmax, "
        "int bits, int group_size, bool sym, ScalarType scale_dtype, float scale_thresh, Tensor? init_scale=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("int_qdq_backward(Tensor grad, Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, "
        "Tensor wmax, int bits, int group_size, bool sym, ScalarType scale_dtype, float scale_thresh, "
        "bool factor_grads, Tensor? init_scale=None) -> (Tensor, Tensor, Tensor)");
  m.def("int_group_extremes(Tensor weight, int group_size) -> (Tensor, Tensor)");
  m.def("sign_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, float lr, float momentum, "
        "bool first, bool clamp01, float clamp_hi=1.0) -> ()");
  m.def("int_init_scale(Tensor weight, int bits, int group_size, Tensor? imatrix, float scale_thresh) -> Tensor");
  define_fp_tune_ops(m);
}

namespace {

// SignRoundV2's init scale [rows, groups] in the weight's dtype: OPT-RTN's imatrix-weighted search with the
// imatrix as collected (no zero fix-up) and the layer's scale floor. Once per layer, so CPU only: a CUDA weight
// is searched on a host copy by the caller.
at::Tensor int_init_scale(const at::Tensor& weight, int64_t bits, int64_t group_size,
                          const std::optional<at::Tensor>& imatrix, double scale_thresh) {
  return guarded([&]() -> at::Tensor {
    constexpr const char* op = "int_init_scale";
    require_cpu_2d(op, "weight", weight);
    const fr::DType dt = float_dtype(op, "weight", weight.scalar_type());
    const at::Tensor w = weight.contiguous();
    const fr::IntGrouping g = fr::int_grouping(w.size(0), w.size(1), group_size, op);
    if (bits < 2 || bits > 8) throw fr::OptionError(arg(op, "bits") + "must be 2..8, got " + std::to_string(bits));
    at::Tensor im;
    const float* im_ptr = nullptr;
    if (imatrix.has_value() && imatrix->defined()) {
      const at::Tensor& m = *imatrix;
      if (m.dim() != 1 || m.size(0) != g.cols || m.scalar_type() != at::kFloat || !m.device().is_cpu())
        throw fr::OptionError(arg(op, "imatrix") + "expected a float32 CPU tensor [" + std::to_string(g.cols) +
                              "], got " + std::string(c10::toString(m.scalar_type())) + " " + shape_str(m.sizes()) +
                              " on " + m.device().str());
      im = m.contiguous();
      im_ptr = im.data_ptr<float>();
    }
    fr::OptRtnOptions opt;
    opt.fix_zero_imatrix = false;
    opt.scale_thresh = static_cast<float>(scale_thresh);
    at::Tensor scales = at::empty({g.rows, g.groups}, w.options());
    {
      GilFree nogil;
      if (const int64_t bad = fr::count_nonfinite(dt, w.data_ptr(), g.rows * g.cols))
        throw fr::OptionError(arg(op, "weight") + std::to_string(bad) + " NaN/Inf values; refusing to quantize");
      fr::int_opt_rtn(dt, w.data_ptr(), g, static_cast<int>(bits), im_ptr, nullptr, scales.data_ptr(), opt);
    }
    return scales;
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastround, CPU, m) {
  register_tune_ops<CpuKernels>(m);
  register_fp_tune_ops<CpuKernels>(m);
  m.impl("int_init_scale", TORCH_FN(int_init_scale));
}
