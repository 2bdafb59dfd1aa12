// SignRound's tuning ops on CPU tensors (torch.ops.fastround.int_qdq*, sign_sgd_step_): the adapters of
// cpp/fastround/tune. Autograd and fake kernels are registered in python/fastround/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastround/tune/int_qdq.h"
#include "fastround/tune/sign_sgd.h"
#include "torch_adapter.h"

namespace ft = fastround::tune;
using namespace fastround_torch;

namespace {

// The kernel view over (weight, v, factors, extremes), every tensor checked against the weight's grouping.
struct QdqArgs {
  at::Tensor weight, v, min_scale, max_scale, wmin, wmax;
  ft::IntQdqView view;
  ft::IntQdqParams params;
};

const float* factor_ptr(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n,
                        at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  if (t->scalar_type() != at::kFloat || t->numel() != n || !t->device().is_cpu())
    throw fr::OptionError(arg(op, name) + "expected float32 CPU with " + std::to_string(n) + " elements, got " +
                          std::string(c10::toString(t->scalar_type())) + " " + shape_str(t->sizes()));
  keep = t->contiguous();
  return keep.data_ptr<float>();
}

QdqArgs qdq_args(const char* op, const at::Tensor& weight, const at::Tensor& v, const std::optional<at::Tensor>& min_s,
                 const std::optional<at::Tensor>& max_s, const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits,
                 int64_t group_size, bool sym, at::ScalarType scale_dtype, double thresh) {
  QdqArgs a;
  require_cpu_2d(op, "weight", weight);
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
  if (v.scalar_type() != at::kFloat || v.dim() != 2 || v.size(0) != ng || v.size(1) != a.view.group ||
      !v.device().is_cpu())
    throw fr::OptionError(arg(op, "v") + "expected float32 CPU [" + std::to_string(ng) + ", " +
                          std::to_string(a.view.group) + "], got " + std::string(c10::toString(v.scalar_type())) + " " +
                          shape_str(v.sizes()));
  a.v = v.contiguous();
  a.view.v = a.v.data_ptr<float>();
  a.view.min_scale = factor_ptr(op, "min_scale", min_s, ng, a.min_scale);
  a.view.max_scale = factor_ptr(op, "max_scale", max_s, ng, a.max_scale);
  a.view.wmin = factor_ptr(op, "wmin", wmin, ng, a.wmin);
  a.view.wmax = factor_ptr(op, "wmax", wmax, ng, a.wmax);
  if (!a.view.wmin || !a.view.wmax) throw fr::OptionError(arg(op, "wmin/wmax") + "required");
  return a;
}

// qdq [rows, cols] in the weight's dtype; scale [rows, groups] fp32 (already rounded to scale_dtype).
std::tuple<at::Tensor, at::Tensor> int_qdq(const at::Tensor& weight, const at::Tensor& v,
                                           const std::optional<at::Tensor>& min_scale,
                                           const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin,
                                           const at::Tensor& wmax, int64_t bits, int64_t group_size, bool sym,
                                           at::ScalarType scale_dtype, double scale_thresh) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor> {
    const QdqArgs a = qdq_args("int_qdq", weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym,
                               scale_dtype, scale_thresh);
    at::Tensor qdq = at::empty_like(a.weight);
    at::Tensor scale = at::empty({a.view.rows, a.view.groups}, at::TensorOptions().dtype(at::kFloat));
    GilFree nogil;
    ft::int_qdq_forward(a.view, a.params, qdq.data_ptr(), scale.data_ptr<float>());
    return {qdq, scale};
  });
}

// What export takes from a tuned layer: codes [rows, cols] uint8, scales [rows, groups] in scale_dtype, zeros
// [rows, groups] int32, and the qdq weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int_qdq_codes(
    const at::Tensor& weight, const at::Tensor& v, const std::optional<at::Tensor>& min_scale,
    const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits,
    int64_t group_size, bool sym, at::ScalarType scale_dtype, double scale_thresh) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    const QdqArgs a = qdq_args("int_qdq_codes", weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym,
                               scale_dtype, scale_thresh);
    at::Tensor qdq = at::empty_like(a.weight);
    at::Tensor scale = at::empty({a.view.rows, a.view.groups}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor codes = at::empty({a.view.rows, a.view.cols}, at::TensorOptions().dtype(at::kByte));
    at::Tensor zeros = at::empty({a.view.rows, a.view.groups}, at::TensorOptions().dtype(at::kInt));
    {
      GilFree nogil;
      ft::int_qdq_forward(a.view, a.params, qdq.data_ptr(), scale.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                          zeros.data_ptr<int32_t>());
    }
    return {qdq, codes, scale.to(scale_dtype), zeros};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int_qdq_backward(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& v, const std::optional<at::Tensor>& min_scale,
    const std::optional<at::Tensor>& max_scale, const at::Tensor& wmin, const at::Tensor& wmax, int64_t bits,
    int64_t group_size, bool sym, at::ScalarType scale_dtype, double scale_thresh, bool factor_grads) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "int_qdq_backward";
    const QdqArgs a = qdq_args(op, weight, v, min_scale, max_scale, wmin, wmax, bits, group_size, sym, scale_dtype,
                               scale_thresh);
    require_cpu_2d(op, "grad", grad);
    if (grad.sizes() != a.weight.sizes() || grad.scalar_type() != a.weight.scalar_type())
      throw fr::OptionError(arg(op, "grad") + "must match the weight, got " +
                            std::string(c10::toString(grad.scalar_type())) + " " + shape_str(grad.sizes()));
    const at::Tensor g = grad.contiguous();
    at::Tensor gv = at::empty_like(a.v);
    const int64_t ng = a.view.rows * a.view.groups;
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor gmin = factor_grads ? at::empty({ng}, f32) : at::Tensor();
    at::Tensor gmax = factor_grads ? at::empty({ng}, f32) : at::Tensor();
    GilFree nogil;
    ft::int_qdq_backward(a.view, a.params, g.data_ptr(), gv.data_ptr<float>(),
                         factor_grads ? gmin.data_ptr<float>() : nullptr,
                         factor_grads ? gmax.data_ptr<float>() : nullptr);
    return {gv, gmin, gmax};
  });
}

// wmin, wmax [rows, groups] fp32 of a weight [rows, cols], frozen when a layer is wrapped.
std::tuple<at::Tensor, at::Tensor> int_group_extremes(const at::Tensor& weight, int64_t group_size) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor> {
    constexpr const char* op = "int_group_extremes";
    require_cpu_2d(op, "weight", weight);
    const at::Tensor w = weight.contiguous();
    ft::IntQdqView view;
    view.rows = w.size(0);
    view.cols = w.size(1);
    ft::IntQdqParams p;
    p.group_size = group_size;
    ft::int_qdq_layout(view, p, op);
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor wmin = at::empty({view.rows, view.groups}, f32), wmax = at::empty({view.rows, view.groups}, f32);
    GilFree nogil;
    ft::int_group_extremes(float_dtype(op, "weight", w.scalar_type()), w.data_ptr(), view.rows, view.cols, view.group,
                           view.groups, wmin.data_ptr<float>(), wmax.data_ptr<float>());
    return {wmin, wmax};
  });
}

// One sign-SGD step over a parameter group, in place (params and momentum buffers).
void sign_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                    bool first, bool clamp01) {
  guarded([&]() {
    constexpr const char* op = "sign_sgd_step_";
    if (grads.size() != params.size() || (momentum != 0 && bufs.size() != params.size()))
      throw fr::OptionError(arg(op, "grads/bufs") + "one per parameter");
    ft::SignSgdParams s;
    s.lr = static_cast<float>(lr);
    s.momentum = static_cast<float>(momentum);
    s.first = first;
    s.clamp01 = clamp01;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor& g = grads[i];
      if (p.scalar_type() != at::kFloat || !p.is_contiguous() || !p.device().is_cpu() ||
          g.scalar_type() != at::kFloat || g.numel() != p.numel() || !g.device().is_cpu())
        throw fr::OptionError(arg(op, "params") + "expected contiguous float32 CPU tensors with float32 gradients");
      const at::Tensor gc = g.contiguous();
      float* buf = nullptr;
      if (momentum != 0) {
        const at::Tensor& b = bufs[i];
        if (b.scalar_type() != at::kFloat || b.numel() != p.numel() || !b.is_contiguous())
          throw fr::OptionError(arg(op, "bufs") + "expected contiguous float32 buffers like the parameters");
        buf = b.data_ptr<float>();
      }
      GilFree nogil;
      ft::sign_sgd_step(p.data_ptr<float>(), gc.data_ptr<float>(), buf, p.numel(), s);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastround, m) {
  m.def("int_qdq(Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, Tensor wmax, int bits, "
        "int group_size, bool sym, ScalarType scale_dtype, float scale_thresh) -> (Tensor, Tensor)");
  m.def("int_qdq_codes(Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, Tensor wmax, "
        "int bits, int group_size, bool sym, ScalarType scale_dtype, float scale_thresh) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("int_qdq_backward(Tensor grad, Tensor weight, Tensor v, Tensor? min_scale, Tensor? max_scale, Tensor wmin, "
        "Tensor wmax, int bits, int group_size, bool sym, ScalarType scale_dtype, float scale_thresh, "
        "bool factor_grads) -> (Tensor, Tensor, Tensor)");
  m.def("int_group_extremes(Tensor weight, int group_size) -> (Tensor, Tensor)");
  m.def("sign_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, float lr, float momentum, "
        "bool first, bool clamp01) -> ()");
}

TORCH_LIBRARY_IMPL(fastround, CPU, m) {
  m.impl("int_qdq", TORCH_FN(int_qdq));
  m.impl("int_qdq_codes", TORCH_FN(int_qdq_codes));
  m.impl("int_qdq_backward", TORCH_FN(int_qdq_backward));
  m.impl("int_group_extremes", TORCH_FN(int_group_extremes));
  m.impl("sign_sgd_step_", TORCH_FN(sign_sgd_step_));
}
