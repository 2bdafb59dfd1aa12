// The MXFP / NVFP4_E5M3 tuning ops' adapters (torch.ops.fastround.fp_qdq*), written once for the CPU (bind_tune_torch.cpp) and
// CUDA (bind_tune_cuda.cpp) registrations, as tune_adapter.h does for INT. A Kernels policy provides
//   static at::Device device(op, name, t)
//   static void fp_forward(device, view, params, qdq, exponent, codes, scales)
//   static void fp_backward(device, view, params, grad, grad_v, grad_max, grad_x)
// The checks (devices, dtypes, shapes against the data type's grouping) and the outputs' allocation are shared.
#pragma once

#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "fastround/tune/fp_qdq.h"
#include "tune_checks.h"

namespace fastround_torch {

namespace ft = fastround::tune;

// The kernel view over (x, v, max_scale), each checked against x's grouping; contiguous copies kept here.
struct FpQdqArgs {
  at::Tensor x, v, max_scale;
  ft::FpQdqView view;
  ft::FpQdqParams params;
};

inline FpQdqArgs fp_qdq_args(const char* op, const at::Device& device, const at::Tensor& x,
                             const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& max_scale,
                             int64_t bits, c10::string_view data_type, double global_scale) {
  FpQdqArgs a;
  require_2d_on(op, "x", x, device);
  if (data_type != "mx_fp" && data_type != "nvfp4_v2" && data_type != "nv_fp")
    throw fr::OptionError(arg(op, "data_type") + "must be 'mx_fp', 'nvfp4_v2' or 'nv_fp', got '" +
                          std::string(data_type) + "'");
  a.params.nv_e5m3 = data_type == "nvfp4_v2";
  a.params.nv_fp4 = data_type == "nv_fp";
  // NVFP4's per-tensor global scale, an fp32 value carried exactly by the schema's double.
  const float gs = static_cast<float>(global_scale);
  if (a.params.nv_fp4 && (!std::isfinite(gs) || gs < 0.0f || static_cast<double>(gs) != global_scale))
    throw fr::OptionError(arg(op, "global_scale") + "must be a finite fp32 value >= 0 (NVFP4), got " +
                          std::to_string(global_scale));
  a.params.global_scale = a.params.nv_fp4 ? gs : 0.0f;
  const int64_t group = a.params.group();
  if (x.size(1) % group != 0)
    throw fr::OptionError(arg(op, "x") + "columns must be a multiple of the group size " + std::to_string(group) +
                          ", got " + shape_str(x.sizes()));
  if (bits != 4 && (bits != 8 || a.params.nv_e5m3 || a.params.nv_fp4))
    throw fr::OptionError(arg(op, "bits") + "must be 4 or 8 (MXFP), 4 (NVFP4, NVFP4_E5M3), got " +
                          std::to_string(bits));
  a.x = x.contiguous();
  a.params.bits = static_cast<int>(bits);
  a.view.dtype = float_dtype(op, "x", x.scalar_type());
  a.view.x = a.x.data_ptr();
  a.view.rows = x.size(0);
  a.view.cols = x.size(1);
  const int64_t ng = a.view.rows * (a.view.cols / group);
  if (v.has_value() && v->defined()) require_offsets(op, *v, ng, group, device);
  a.view.v = float_param_ptr(op, "v", v, ng * group, device, a.v);
  a.view.max_scale = float_param_ptr(op, "max_scale", max_scale, ng, device, a.max_scale);
  return a;
}

// qdq like x; exponent [rows, cols/g] fp32 (MX: the clamped shared exponent; NV: the decoded UE5M3 scale).
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> fp_qdq_op(const at::Tensor& x, const std::optional<at::Tensor>& v,
                                             const std::optional<at::Tensor>& max_scale, int64_t bits,
                                             c10::string_view data_type, double global_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor> {
    constexpr const char* op = "fp_qdq";
    const at::Device dev = Kernels::device(op, "x", x);
    const FpQdqArgs a = fp_qdq_args(op, dev, x, v, max_scale, bits, data_type, global_scale);
    at::Tensor qdq = at::empty_like(a.x);
    at::Tensor e = at::empty({a.view.rows, a.view.cols / a.params.group()}, a.x.options().dtype(at::kFloat));
    Kernels::fp_forward(dev, a.view, a.params, qdq.data_ptr(), e.data_ptr<float>(), nullptr, nullptr);
    return {qdq, e};
  });
}

// What export takes from a tuned layer: qdq, codes [rows, cols] uint8 (E2M1 nibbles / E4M3 bytes), scales
// [rows, cols/g] uint8 (E8M0; NV: UE5M3).
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fp_qdq_codes_op(const at::Tensor& x, const std::optional<at::Tensor>& v,
                                                               const std::optional<at::Tensor>& max_scale,
                                                               int64_t bits, c10::string_view data_type,
                                                               double global_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "fp_qdq_codes";
    const at::Device dev = Kernels::device(op, "x", x);
    const FpQdqArgs a = fp_qdq_args(op, dev, x, v, max_scale, bits, data_type, global_scale);
    const auto opts = a.x.options();
    const int64_t g = a.view.cols / a.params.group();
    at::Tensor qdq = at::empty_like(a.x);
    at::Tensor e = at::empty({a.view.rows, g}, opts.dtype(at::kFloat));
    at::Tensor codes = at::empty({a.view.rows, a.view.cols}, opts.dtype(at::kByte));
    at::Tensor scales = at::empty({a.view.rows, g}, opts.dtype(at::kByte));
    Kernels::fp_forward(dev, a.view, a.params, qdq.data_ptr(), e.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                        scales.data_ptr<uint8_t>());
    return {qdq, codes, scales};
  });
}

// grad_v [rows*cols/g, g] fp32, grad_max [rows*cols/g] fp32, grad_x like x: each only when asked (else empty).
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fp_qdq_backward_op(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& max_scale, int64_t bits, bool need_v, bool need_max, bool need_x,
    c10::string_view data_type, double global_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "fp_qdq_backward";
    const at::Device dev = Kernels::device(op, "x", x);
    const FpQdqArgs a = fp_qdq_args(op, dev, x, v, max_scale, bits, data_type, global_scale);
    const at::Tensor g = require_grad_like(op, dev, grad, a.x, "x");
    const int64_t group = a.params.group(), ng = a.view.rows * (a.view.cols / group);
    const auto f32 = a.x.options().dtype(at::kFloat);
    at::Tensor gv = need_v ? at::empty({ng, group}, f32) : at::empty({0}, f32);
    at::Tensor gmax = need_max ? at::empty({ng}, f32) : at::empty({0}, f32);
    at::Tensor gx = need_x ? at::empty_like(a.x) : at::empty({0}, a.x.options());
    Kernels::fp_backward(dev, a.view, a.params, g.data_ptr(), need_v ? gv.data_ptr<float>() : nullptr,
                         need_max ? gmax.data_ptr<float>() : nullptr, need_x ? gx.data_ptr() : nullptr);
    return {gv, gmax, gx};
  });
}

inline void define_fp_tune_ops(torch::Library& m) {
  m.def("fp_qdq(Tensor x, Tensor? v, Tensor? max_scale, int bits, str data_type=\"mx_fp\", "
        "float global_scale=0.0) -> (Tensor, Tensor)");
  m.def("fp_qdq_codes(Tensor x, Tensor? v, Tensor? max_scale, int bits, str data_type=\"mx_fp\", "
        "float global_scale=0.0) -> (Tensor, Tensor, Tensor)");
  m.def("fp_qdq_backward(Tensor grad, Tensor x, Tensor? v, Tensor? max_scale, int bits, bool need_v, "
        "bool need_max, bool need_x, str data_type=\"mx_fp\", float global_scale=0.0) -> (Tensor, Tensor, Tensor)");
}

template <typename Kernels>
void register_fp_tune_ops(torch::Library& m) {
  m.impl("fp_qdq", TORCH_FN(fp_qdq_op<Kernels>));
  m.impl("fp_qdq_codes", TORCH_FN(fp_qdq_codes_op<Kernels>));
  m.impl("fp_qdq_backward", TORCH_FN(fp_qdq_backward_op<Kernels>));
}

}  // namespace fastround_torch
