// Thin LibTorch adapter, its own module fastround._torch: the INT kernel on torch tensors. The only file that
// includes torch headers; fastround._C stays free of libtorch so model-free runs never load torch.
#include <torch/extension.h>

#include "bindings.h"
#include "errors.h"
#include "fastround/quant/int_rtn.h"

namespace fr = fastround;

namespace {

fr::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return fr::DType::F32;
    case torch::kFloat16: return fr::DType::F16;
    case torch::kBFloat16: return fr::DType::BF16;
    default:
      throw fr::OptionError(std::string("[quantize_int_gptq_tensor] weight dtype must be float32, float16 or "
                                        "bfloat16, got ") + std::string(c10::toString(t.scalar_type())));
  }
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_int_gptq_tensor(const torch::Tensor& weight, int bits,
                                                                                   int64_t group_size, bool sym,
                                                                                   int zero_offset) {
  if (weight.dim() != 2 || !weight.device().is_cpu())
    throw py::value_error("[quantize_int_gptq_tensor] weight must be a 2-D CPU tensor [out, in]");
  const torch::Tensor w = weight.contiguous();
  const fr::IntQuantParams p{bits, group_size, sym, zero_offset};
  const fr::IntGptqLayout L = fr::int_gptq_layout(w.size(0), w.size(1), p, "weight");
  auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  torch::Tensor qweight = torch::empty({L.cols_p / L.pack_factor, L.rows}, i32);  // [in_p/pf, out]
  torch::Tensor qzeros = torch::empty({L.groups, L.rows_p / L.pack_factor}, i32);  // [groups, out_p/pf]
  torch::Tensor scales = torch::empty({L.groups, L.rows}, torch::TensorOptions().dtype(torch::kFloat16));
  {
    py::gil_scoped_release release;
    fr::quantize_int_gptq(dtype_of(w), w.data_ptr(), L, p, qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(),
                          reinterpret_cast<uint16_t*>(scales.data_ptr()));
  }
  return {qweight, qzeros, scales};
}

}  // namespace

PYBIND11_MODULE(_torch, m) {
  m.doc() = "fastround LibTorch adapters";
  fastround_py::register_error_translator(py::module_::import("fastround._C").attr("CheckpointError"));
  m.def("quantize_int_gptq_tensor", &quantize_int_gptq_tensor, py::arg("weight"), py::arg("bits"),
        py::arg("group_size"), py::arg("sym"), py::arg("zero_offset") = 1,
        "RTN-quantize a torch weight [out, in] and pack it as auto_gptq: (qweight, qzeros, scales fp16).");
}
