// The tuning ops' adapters (torch.ops.fastround.int_qdq*, sign_sgd_step_), written once for the CPU
// (bind_tune_torch.cpp) and CUDA (bind_tune_cuda.cpp) registrations. Each op is a template over a Kernels policy:
//   static at::Device device(op, name, t)  the device every tensor must be on, taken from the op's first tensor
//   static void forward / backward / extremes / sign_sgd(device, ...)  runs the core's kernels for that device
// The checks (every tensor on that device, dtypes and shapes against the weight's grouping) and the outputs'
// allocation are shared; the kernel views point into contiguous tensors kept alive here.
#pragma once

#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastround/tune/int_qdq.h"
#include "fastround/tune/sign_sgd.h"
#include "tune_checks.h"

namespace fastround_torch {

namespace ft = fastround::tune;

// The kernel view over (weight, v, factors, extremes), every tensor checked against the weight's grouping.
struct QdqArgs {
  at::Tensor weight, v, min_scale, max_scale, wmin, wmax, init_scale;
  ft::IntQdqView view;
  ft::IntQdqParams params;
};

inline QdqArgs qdq_args(const char* op, const at::Device& device, const at::Tensor& weight, const at::Tensor& v,
                        const std::optional<at::Tensor>& min_s, const std::optional<at::Tensor>& max_s,
                        const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits, int64_t group_size, bool sym,
                        at::ScalarType scale_dtype, double thresh, const std::optional<at::Tensor>& init_scale) {
  QdqArgs a;
  require_2d_on(op, "weight", weight, device);
  a.weight = weight.contiguous();
  a.params.bits = static_cast<int>(bits);
  a.params.group_size = group_size;
  a.params.sym = sym;
  a.params.scale_dtype = float_dtype(op, "scale_dtype", scale_dtype);
  a.params.scale_thresh = static_cast<float>(thresh);
  a.view.dtype = float_dtype(op, "weight", weight.scalar_type());
  a.view.weight = a.weight.data_ptr();
  a.view.rows = weight.size(0);
  a.view.cols = weight.size(1);
  ft::int_qdq_layout(a.view, a.params, op);
  const int64_t ng = a.view.rows * a.view.groups;
  require_offsets(op, v, ng, a.view.group, device);
  a.v = v.contiguous();
  a.view.v = a.v.data_ptr<float>();
  a.view.min_scale = float_param_ptr(op, "min_scale", min_s, ng, device, a.min_scale);
  a.view.max_scale = float_param_ptr(op, "max_scale", max_s, ng, device, a.max_scale);
  a.view.wmin = float_param_ptr(op, "wmin", wmin, ng, device, a.wmin);
  a.view.wmax = float_param_ptr(op, "wmax", wmax, ng, device, a.wmax);
  if (!a.view.wmin || !a.view.wmax) throw fr::OptionError(arg(op, "wmin/wmax") + "required");
  a.view.init_scale = float_param_ptr(op, "init_scale", init_scale, ng, device, a.init_scale);
  if (a.view.init_scale && !sym) throw fr::OptionError(arg(op, "init_scale") + "SignRoundV2's init scale needs sym");
  return a;
}

// One sign-SGD step's tensors, checked: contiguous float32 parameters (and momentum buffers) on `device`, float32
// gradients of the same size; `keep` holds contiguous copies of the gradients until the kernels are done.
struct SgdArgs {
  ft::SignSgdParams params;
  std::vector<ft::SignSgdTensor> tensors;
  std::vector<at::Tensor> keep;
};

inline SgdArgs sgd_args(const char* op, const at::Device& device, at::TensorList params, at::TensorList grads,
                        at::TensorList bufs, double lr, double momentum, bool first, bool clamp01, double clamp_hi) {
  if (grads.size() != params.size() || (momentum != 0 && bufs.size() != params.size()))
    throw fr::OptionError(arg(op, "grads/bufs") + "one per parameter");
  SgdArgs a;
  a.params.lr = static_cast<float>(lr);
  a.params.momentum = static_cast<float>(momentum);
  a.params.first = first;
  a.params.clamp01 = clamp01;
  a.params.clamp_hi = static_cast<float>(clamp_hi);
  if (clamp01 && !(clamp_hi > 0))
    throw fr::OptionError(arg(op, "clamp_hi") + "must be positive, got " + std::to_string(clamp_hi));
  const std::string where = device_label(device);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    if (p.scalar_type() != at::kFloat || !p.is_contiguous() || p.device() != device ||
        g.scalar_type() != at::kFloat || g.numel() != p.numel() || g.device() != device)
      throw fr::OptionError(arg(op, "params") + "expected contiguous float32 " + where +
                            " tensors with float32 gradients, got " + std::string(c10::toString(p.scalar_type())) +
                            " on " + p.device().str() + " (parameter " + std::to_string(i) + ")");
    a.keep.push_back(g.contiguous());
    float* buf = nullptr;
    if (momentum != 0) {
      const at::Tensor& b = bufs[i];
      if (b.scalar_type() != at::kFloat || b.numel() != p.numel() || !b.is_contiguous() || b.device() != device)
        throw fr::OptionError(arg(op, "bufs") + "expected contiguous float32 " + where +
                              " buffers like the parameters (parameter " + std::to_string(i) + ")");
      buf = b.data_ptr<float>();
    }
    a.tensors.push_back({p.data_ptr<float>(), a.keep.back().data_ptr<float>(), buf, p.numel()});
  }
  return a;
}

// ---- the ops ----

// qdq [rows, cols] in the weight's dtype; scale [rows, groups] fp32 (already rounded to scale_dtype).
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> int_qdq_op(const at::Tensor& weight, const at::Tensor& v,
                                              const std::optional<at::Tensor>& min_scale,
                                              const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin,
                                              const at::Tensor& wmax, int64_t bits, int64_t group_size, bool sym,
                                              at::ScalarType scale_dtype, double scale_thresh,
                                              const std::optional<at::Tensor>& init_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor> {
    constexpr const char* op = "int_qdq";
    const at::Device dev = Kernels::device(op, "weight", weight);
    const QdqArgs a = qdq_args(op, dev, weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym,
                               scale_dtype, scale_thresh, init_scale);
    at::Tensor qdq = at::empty_like(a.weight);
    at::Tensor scale = at::empty({a.view.rows, a.view.groups}, a.weight.options().dtype(at::kFloat));
    Kernels::forward(dev, a.view, a.params, qdq.data_ptr(), scale.data_ptr<float>(), nullptr, nullptr);
    return {qdq, scale};
  });
}

// What export takes from a tuned layer: codes [rows, cols] uint8, scales [rows, groups] in scale_dtype, zeros
// [rows, groups] int32, and the qdq weight.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int_qdq_codes_op(
    const at::Tensor& weight, const at::Tensor& v, const std::optional<at::Tensor>& min_scale,
    const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits,
    int64_t group_size, bool sym, at::ScalarType scale_dtype, double scale_thresh,
    const std::optional<at::Tensor>& init_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "int_qdq_codes";
    const at::Device dev = Kernels::device(op, "weight", weight);
    const QdqArgs a = qdq_args(op, dev, weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym,
                               scale_dtype, scale_thresh, init_scale);
    const auto opts = a.weight.options();
    at::Tensor qdq = at::empty_like(a.weight);
    at::Tensor scale = at::empty({a.view.rows, a.view.groups}, opts.dtype(at::kFloat));
    at::Tensor codes = at::empty({a.view.rows, a.view.cols}, opts.dtype(at::kByte));
    at::Tensor zeros = at::empty({a.view.rows, a.view.groups}, opts.dtype(at::kInt));
    Kernels::forward(dev, a.view, a.params, qdq.data_ptr(), scale.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                     zeros.data_ptr<int32_t>());
    return {qdq, codes, scale.to(scale_dtype), zeros};
  });
}

// grad_v like v; grad_min / grad_max [rows * groups] fp32 when factor_grads, else undefined.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> int_qdq_backward_op(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& v, const std::optional<at::Tensor>& min_scale,
    const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits,
    int64_t group_size, bool sym, at::ScalarType scale_dtype, double scale_thresh, bool factor_grads,
    const std::optional<at::Tensor>& init_scale) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "int_qdq_backward";
    const at::Device dev = Kernels::device(op, "weight", weight);
    const QdqArgs a = qdq_args(op, dev, weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym,
                               scale_dtype, scale_thresh, init_scale);
    const at::Tensor g = require_grad_like(op, dev, grad, a.weight, "the weight");
    at::Tensor gv = at::empty_like(a.v);
    const int64_t ng = a.view.rows * a.view.groups;
    const auto f32 = a.v.options();
    at::Tensor gmin = factor_grads ? at::empty({ng}, f32) : at::Tensor();
    at::Tensor gmax = factor_grads ? at::empty({ng}, f32) : at::Tensor();
    Kernels::backward(dev, a.view, a.params, g.data_ptr(), gv.data_ptr<float>(),
                      factor_grads ? gmin.data_ptr<float>() : nullptr,
                      factor_grads ? gmax.data_ptr<float>() : nullptr);
    return {gv, gmin, gmax};
  });
}

// wmin, wmax [rows, groups] fp32 of a weight [rows, cols], frozen when a layer is wrapped.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> int_group_extremes_op(const at::Tensor& weight, int64_t group_size) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor> {
    constexpr const char* op = "int_group_extremes";
    const at::Device dev = Kernels::device(op, "weight", weight);
    require_2d_on(op, "weight", weight, dev);
    const at::Tensor w = weight.contiguous();
    const fr::DType dt = float_dtype(op, "weight", w.scalar_type());
    ft::IntQdqView view;
    view.rows = w.size(0);
    view.cols = w.size(1);
    ft::IntQdqParams layout;
    layout.group_size = group_size;
    ft::int_qdq_layout(view, layout, op);
    const auto f32 = w.options().dtype(at::kFloat);
    at::Tensor wmin = at::empty({view.rows, view.groups}, f32), wmax = at::empty({view.rows, view.groups}, f32);
    Kernels::extremes(dev, dt, w.data_ptr(), view.rows, view.cols, view.group, view.groups, wmin.data_ptr<float>(),
                      wmax.data_ptr<float>());
    return {wmin, wmax};
  });
}

// One sign-SGD step over a parameter group, in place (params and momentum buffers).
template <typename Kernels>
void sign_sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                      bool first, bool clamp01, double clamp_hi) {
  guarded([&]() {
    constexpr const char* op = "sign_sgd_step_";
    const at::Device dev = params.empty() ? at::Device(at::kCPU) : Kernels::device(op, "params", params[0]);
    const SgdArgs a = sgd_args(op, dev, params, grads, bufs, lr, momentum, first, clamp01, clamp_hi);
    if (!a.tensors.empty()) Kernels::sign_sgd(dev, a.tensors, a.params);
  });
}

// Registers the five ops' implementations for one dispatch key.
template <typename Kernels>
void register_tune_ops(torch::Library& m) {
  m.impl("int_qdq", TORCH_FN(int_qdq_op<Kernels>));
  m.impl("int_qdq_codes", TORCH_FN(int_qdq_codes_op<Kernels>));
  m.impl("int_qdq_backward", TORCH_FN(int_qdq_backward_op<Kernels>));
  m.impl("int_group_extremes", TORCH_FN(int_group_extremes_op<Kernels>));
  m.impl("sign_sgd_step_", TORCH_FN(sign_sgd_step_op<Kernels>));
}

}  // namespace fastround_torch
