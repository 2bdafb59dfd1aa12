// What every LibTorch adapter file of fastround._torch shares: releasing the GIL around kernels, mapping the
// core's OptionError to a torch ValueError that names op and argument, and dtype / shape conversions.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>

#include "fastround/common/dtype.h"
#include "fastround/common/error.h"

namespace fastround_torch {

namespace py = pybind11;
namespace fr = fastround;

// Ops reached through torch.ops already run without the GIL; a direct call from C++ with it held releases it.
struct GilFree {
  std::optional<py::gil_scoped_release> release;
  GilFree() {
    if (Py_IsInitialized() && PyGILState_Check()) release.emplace();
  }
};

// Bad arguments reach Python as ValueError (torch maps c10::ValueError), the message naming op and argument.
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const fr::OptionError& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

inline std::string arg(const char* op, const char* name) { return std::string("[fastround.") + op + "] " + name + ": "; }

inline fr::DType float_dtype(const char* op, const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fr::DType::F32;
    case at::kHalf: return fr::DType::F16;
    case at::kBFloat16: return fr::DType::BF16;
    default:
      throw fr::OptionError(arg(op, name) + "dtype must be float32, float16 or bfloat16, got " +
                            std::string(c10::toString(t)));
  }
}

inline at::ScalarType torch_dtype(fr::DType dt) {
  switch (dt) {
    case fr::DType::F32: return at::kFloat;
    case fr::DType::F16: return at::kHalf;
    case fr::DType::BF16: return at::kBFloat16;
    case fr::DType::I32: return at::kInt;
    case fr::DType::U8: return at::kByte;
    case fr::DType::F8_E4M3: return at::kFloat8_e4m3fn;
    default: throw fr::OptionError("[fastround] no torch dtype for " + std::string(fr::dtype_name(dt)));
  }
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// "CPU" or the CUDA device ("cuda:0"), as error messages name where a tensor was expected.
inline std::string device_label(const at::Device& d) { return d.is_cpu() ? std::string("CPU") : d.str(); }

// A non-empty 2-D tensor on `device` (the CPU adapters pass the CPU, the CUDA adapters the weight's device).
inline void require_2d_on(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  if (!t.defined() || t.dim() != 2 || t.device() != device)
    throw fr::OptionError(arg(op, name) + "expected a 2-D " + device_label(device) + " tensor, got " +
                          (t.defined() ? shape_str(t.sizes()) + " on " + t.device().str() : std::string("None")));
  if (t.size(0) == 0 || t.size(1) == 0) throw fr::OptionError(arg(op, name) + "is empty " + shape_str(t.sizes()));
}

inline void require_cpu_2d(const char* op, const char* name, const at::Tensor& t) {
  require_2d_on(op, name, t, at::Device(at::kCPU));
}

}  // namespace fastround_torch
