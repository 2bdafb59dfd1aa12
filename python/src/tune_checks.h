// Tensor checks the INT (tune_adapter.h) and MXFP / NVFP (tune_fp_adapter.h) tuning ops share: the optional
// per-group float32 tensors, the rounding offsets V and the backward's incoming gradient.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>

#include "torch_adapter.h"

namespace fastround_torch {

// An optional float32 tensor of n elements on `device`: its data (a contiguous copy kept in `keep`), or nullptr.
inline const float* float_param_ptr(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n,
                                    const at::Device& device, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  if (t->scalar_type() != at::kFloat || t->numel() != n || t->device() != device)
    throw fr::OptionError(arg(op, name) + "expected float32 " + device_label(device) + " with " + std::to_string(n) +
                          " elements, got " + std::string(c10::toString(t->scalar_type())) + " " +
                          shape_str(t->sizes()) + " on " + t->device().str());
  keep = t->contiguous();
  return keep.data_ptr<float>();
}

// The rounding offsets v: float32 [groups, group] on `device`.
inline void require_offsets(const char* op, const at::Tensor& v, int64_t groups, int64_t group,
                            const at::Device& device) {
  if (v.scalar_type() != at::kFloat || v.dim() != 2 || v.size(0) != groups || v.size(1) != group ||
      v.device() != device)
    throw fr::OptionError(arg(op, "v") + "expected float32 " + device_label(device) + " [" + std::to_string(groups) +
                          ", " + std::to_string(group) + "], got " + std::string(c10::toString(v.scalar_type())) +
                          " " + shape_str(v.sizes()) + " on " + v.device().str());
}

// A backward's incoming gradient: 2-D on `device` with the shape and dtype of `like` (named `like_name` in the
// error); contiguous.
inline at::Tensor require_grad_like(const char* op, const at::Device& device, const at::Tensor& grad,
                                    const at::Tensor& like, const char* like_name) {
  require_2d_on(op, "grad", grad, device);
  if (grad.sizes() != like.sizes() || grad.scalar_type() != like.scalar_type())
    throw fr::OptionError(arg(op, "grad") + "must match " + like_name + ", got " +
                          std::string(c10::toString(grad.scalar_type())) + " " + shape_str(grad.sizes()));
  return grad.contiguous();
}

}  // namespace fastround_torch
