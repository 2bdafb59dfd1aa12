// Kernels over numpy buffers: lets tests compare the fast and reference paths without torch.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "fastround/common/dtype.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/int_rtn.h"

namespace fr = fastround;

namespace {

fr::DType parse_src_dtype(const std::string& name) {
  auto dt = fr::dtype_from_name(name);
  if (!dt || !fr::dtype_is_float_weight(*dt))
    throw fr::OptionError("[quantize_int_gptq] dtype must be F32, F16 or BF16, got '" + name + "'");
  return *dt;
}

py::tuple quantize_int_gptq_np(py::buffer weight, const std::string& dtype, int64_t rows, int64_t cols, int bits,
                               int64_t group_size, bool sym, int zero_offset, bool reference) {
  const fr::DType dt = parse_src_dtype(dtype);
  py::buffer_info info = weight.request();
  const int64_t need = rows * cols * (fr::dtype_bits(dt) / 8);
  if (info.size * info.itemsize != need)
    throw fr::OptionError("[quantize_int_gptq] weight buffer has " + std::to_string(info.size * info.itemsize) +
                          " bytes, expected " + std::to_string(need));
  const fr::IntQuantParams p{bits, group_size, sym, zero_offset};
  const fr::IntGptqLayout L = fr::int_gptq_layout(rows, cols, p, "weight");
  py::array_t<int32_t> qweight({L.cols_p / L.pack_factor, L.rows});
  py::array_t<int32_t> qzeros({L.groups, L.rows_p / L.pack_factor});
  py::array_t<uint16_t> scales({L.groups, L.rows});
  {
    py::gil_scoped_release release;
    auto fn = reference ? fr::quantize_int_gptq_ref : fr::quantize_int_gptq;
    fn(dt, info.ptr, L, p, qweight.mutable_data(), qzeros.mutable_data(), scales.mutable_data());
  }
  return py::make_tuple(qweight, qzeros, scales);
}

py::array_t<float> dequantize_int_gptq_np(py::array_t<int32_t, py::array::c_style> qweight,
                                          py::array_t<int32_t, py::array::c_style> qzeros,
                                          py::array_t<uint16_t, py::array::c_style> scales, int64_t rows, int64_t cols,
                                          int bits, int64_t group_size, bool sym, int zero_offset) {
  const fr::IntQuantParams p{bits, group_size, sym, zero_offset};
  const fr::IntGptqLayout L = fr::int_gptq_layout(rows, cols, p, "weight");
  if (qweight.size() != L.qweight_elems() || qzeros.size() != L.qzeros_elems() || scales.size() != L.scales_elems())
    throw fr::OptionError("[dequantize_int_gptq] packed tensors do not match weight shape [" + std::to_string(rows) +
                          ", " + std::to_string(cols) + "]");
  py::array_t<float> out({rows, cols});
  fr::dequantize_int_gptq_ref(qweight.data(), qzeros.data(), scales.data(), L, p, out.mutable_data());
  return out;
}

}  // namespace

void init_quant(py::module_& m) {
  m.def("quantize_int_gptq", &quantize_int_gptq_np, py::arg("weight"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("bits"), py::arg("group_size"), py::arg("sym"), py::arg("zero_offset") = 1,
        py::arg("reference") = false,
        R"doc(RTN-quantize a [rows, cols] weight (raw buffer of F32, F16 or BF16 elements) and pack it as
auto_gptq: returns (qweight [in_p/pf, out] int32, qzeros [groups, out_p/pf] int32, scales [groups, out]
as uint16 fp16 bits). reference=True runs the scalar reference instead of the fused kernel.)doc");
  m.def("dequantize_int_gptq", &dequantize_int_gptq_np, py::arg("qweight"), py::arg("qzeros"), py::arg("scales"),
        py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group_size"), py::arg("sym"),
        py::arg("zero_offset") = 1, "Dequantize auto_gptq-packed tensors to float32 [rows, cols].");
  m.def("set_num_threads", &fr::set_num_threads, py::arg("n"), "Threads used by the C++ kernels.");
  m.def("max_threads", &fr::max_threads);
}
