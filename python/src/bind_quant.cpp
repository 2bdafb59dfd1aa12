// Kernels over numpy buffers: lets tests compare the fast and reference paths without torch.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <atomic>
#include <new>

#include "bindings.h"
#include "fastround/common/cpu.h"
#include "fastround/common/dtype.h"
#include "fastround/common/error.h"
#include "fastround/common/nonfinite.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/quant/int_rtn.h"
#include "fastround/source/dequant.h"

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

void check_bytes(const py::buffer_info& info, int64_t need, const char* site) {
  if (info.size * info.itemsize != need)
    throw fr::OptionError(std::string("[") + site + "] buffer has " + std::to_string(info.size * info.itemsize) +
                          " bytes, expected " + std::to_string(need));
}

py::tuple quantize_mxfp_np(py::buffer weight, const std::string& dtype, int64_t rows, int64_t cols, int bits,
                           bool opt_rtn, bool reference) {
  const fr::DType dt = parse_src_dtype(dtype);
  py::buffer_info info = weight.request();
  check_bytes(info, rows * cols * (fr::dtype_bits(dt) / 8), "quantize_mxfp");
  const fr::MxfpLayout L = fr::mxfp_layout(rows, cols, bits, "weight");
  py::array_t<uint8_t> w(bits == 4 ? std::vector<int64_t>{rows, cols / 2} : std::vector<int64_t>{rows, cols});
  py::array_t<uint8_t> scale({rows, cols / 32});
  {
    py::gil_scoped_release release;
    auto fn = reference ? fr::quantize_mxfp_ref : fr::quantize_mxfp;
    fn(dt, info.ptr, L, opt_rtn, w.mutable_data(), scale.mutable_data());
  }
  return py::make_tuple(w, scale);
}

py::array_t<float> dequantize_mxfp_np(py::array_t<uint8_t, py::array::c_style> w,
                                      py::array_t<uint8_t, py::array::c_style> scale, int64_t rows, int64_t cols,
                                      int bits) {
  const fr::MxfpLayout L = fr::mxfp_layout(rows, cols, bits, "weight");
  if (w.size() != L.weight_bytes() || scale.size() != L.scale_bytes())
    throw fr::OptionError("[dequantize_mxfp] tensors do not match weight shape");
  py::array_t<float> out({rows, cols});
  fr::dequantize_mxfp_ref(w.data(), scale.data(), L, out.mutable_data());
  return out;
}

py::tuple quantize_nvfp4_np(py::buffer weight, const std::string& dtype, int64_t rows, int64_t cols, bool opt_rtn,
                            bool reference) {
  const fr::DType dt = parse_src_dtype(dtype);
  py::buffer_info info = weight.request();
  check_bytes(info, rows * cols * (fr::dtype_bits(dt) / 8), "quantize_nvfp4_e5m3");
  py::array_t<uint8_t> packed({rows, cols / 2});
  py::array_t<uint8_t> scale({rows, cols / 16});
  {
    py::gil_scoped_release release;
    auto fn = reference ? fr::quantize_nvfp4_e5m3_ref : fr::quantize_nvfp4_e5m3;
    fn(dt, info.ptr, rows, cols, opt_rtn, packed.mutable_data(), scale.mutable_data());
  }
  return py::make_tuple(packed, scale);
}

py::array fake_quantize_nvfp4_np(py::buffer weight, const std::string& dtype, int64_t rows, int64_t cols,
                                 bool opt_rtn) {
  const fr::DType dt = parse_src_dtype(dtype);
  py::buffer_info info = weight.request();
  const int64_t esize = fr::dtype_bits(dt) / 8;
  check_bytes(info, rows * cols * esize, "fake_quantize_nvfp4_e5m3");
  py::array_t<uint8_t> out({rows, cols * esize});  // raw source-dtype bytes
  {
    py::gil_scoped_release release;
    fr::fake_quantize_nvfp4_e5m3(dt, info.ptr, rows, cols, opt_rtn, out.mutable_data());
  }
  return out;
}

py::array_t<float> dequantize_nvfp4_np(py::array_t<uint8_t, py::array::c_style> packed,
                                       py::array_t<uint8_t, py::array::c_style> scale, int64_t rows, int64_t cols) {
  if (cols % 16 != 0 || packed.size() != rows * cols / 2 || scale.size() != rows * cols / 16)
    throw fr::OptionError("[dequantize_nvfp4_e5m3] tensors do not match weight shape");
  py::array_t<float> out({rows, cols});
  fr::dequantize_nvfp4_e5m3_ref(packed.data(), scale.data(), rows, cols, out.mutable_data());
  return out;
}

py::array_t<uint16_t> dequant_fp8_np(py::array_t<uint8_t, py::array::c_style> w, int64_t rows, int64_t cols,
                                     py::buffer scale, const std::string& scale_dtype, std::vector<int64_t> scale_shape,
                                     int64_t block_rows, int64_t block_cols, bool e8m0, bool reference) {
  auto sdt = fr::dtype_from_name(scale_dtype);
  if (!sdt) throw fr::OptionError("[dequant_fp8] unknown scale dtype '" + scale_dtype + "'");
  py::buffer_info sinfo = scale.request();
  fr::Fp8ScaleView v;
  v.dtype = *sdt;
  v.data = sinfo.ptr;
  v.numel = 1;
  for (auto d : scale_shape) v.numel *= d;
  v.rows = scale_shape.size() == 2 ? scale_shape[0] : 0;
  v.cols = scale_shape.size() == 2 ? scale_shape[1] : 0;
  v.block_rows = block_rows;
  v.block_cols = block_cols;
  v.e8m0 = e8m0;
  if (w.size() != rows * cols) throw fr::OptionError("[dequant_fp8] weight does not match [rows, cols]");
  check_bytes(sinfo, v.numel * fr::dtype_bits(v.dtype) / 8, "dequant_fp8");
  py::array_t<uint16_t> out({rows, cols});
  auto fn = reference ? fr::dequant_fp8_scaled_ref : fr::dequant_fp8_scaled;
  fn(w.data(), rows, cols, v, "weight", out.mutable_data());
  return out;
}

int64_t count_nonfinite_np(py::buffer data, const std::string& dtype, bool reference) {
  const fr::DType dt = parse_src_dtype(dtype);
  py::buffer_info info = data.request();
  const int64_t n = info.size * info.itemsize / (fr::dtype_bits(dt) / 8);
  py::gil_scoped_release release;
  return (reference ? fr::count_nonfinite_ref : fr::count_nonfinite)(dt, info.ptr, n);
}

// Test hook for parallel_for: iterations from `throw_from` on throw `error`; what reaches Python is the
// first one, as the binding maps it, and the process survives.
int64_t parallel_for_probe(int64_t n, int64_t throw_from, const std::string& error) {
  std::atomic<int64_t> ran{0};
  py::gil_scoped_release release;
  fr::parallel_for(n, [&](int64_t i) {
    if (i >= throw_from) {
      const std::string msg = "[parallel_for_probe] iteration " + std::to_string(i);
      if (error == "CheckpointError") throw fr::CheckpointError(msg);
      if (error == "MissingPathError") throw fr::MissingPathError(msg);
      if (error == "OptionError") throw fr::OptionError(msg);
      if (error == "IoError") throw fr::IoError(msg);
      if (error == "Cancelled") throw fr::Cancelled(msg);
      if (error == "bad_alloc") throw std::bad_alloc();
      throw std::runtime_error(msg);
    }
    ran.fetch_add(1, std::memory_order_relaxed);
  });
  return ran.load();
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
  m.def("quantize_mxfp", &quantize_mxfp_np, py::arg("weight"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("bits"), py::arg("opt_rtn") = true, py::arg("reference") = false,
        "MXFP4/MXFP8-quantize a [rows, cols] weight: returns (weight_packed u8 [rows, cols/2] or float8 bytes "
        "[rows, cols], weight_scale u8 E8M0 [rows, cols/32]).");
  m.def("dequantize_mxfp", &dequantize_mxfp_np, py::arg("weight"), py::arg("scale"), py::arg("rows"), py::arg("cols"),
        py::arg("bits"), "Dequantize MXFP tensors to float32 [rows, cols].");
  m.def("quantize_nvfp4_e5m3", &quantize_nvfp4_np, py::arg("weight"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("opt_rtn") = true, py::arg("reference") = false,
        "NVFP4_E5M3-quantize: returns (weight_packed u8 [rows, cols/2], weight_scale u8 UE5M3 [rows, cols/16]).");
  m.def("fake_quantize_nvfp4_e5m3", &fake_quantize_nvfp4_np, py::arg("weight"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("opt_rtn") = true,
        "NVFP4_E5M3 quantize-dequantize, as raw bytes of the source dtype [rows, cols*itemsize].");
  m.def("dequantize_nvfp4_e5m3", &dequantize_nvfp4_np, py::arg("packed"), py::arg("scale"), py::arg("rows"),
        py::arg("cols"), "Dequantize NVFP4_E5M3 tensors to float32 [rows, cols].");
  m.def("dequant_fp8_scaled", &dequant_fp8_np, py::arg("weight"), py::arg("rows"), py::arg("cols"), py::arg("scale"),
        py::arg("scale_dtype"), py::arg("scale_shape"), py::arg("block_rows") = 0, py::arg("block_cols") = 0,
        py::arg("e8m0") = false, py::arg("reference") = false,
        "Dequantize an FP8 E4M3 weight with its weight_scale_inv to bf16 bits [rows, cols].");
  m.def("count_nonfinite", &count_nonfinite_np, py::arg("data"), py::arg("dtype"), py::arg("reference") = false,
        "Number of NaN/Inf elements in a raw buffer of F32, F16 or BF16 elements.");
  m.def("_parallel_for_probe", &parallel_for_probe, py::arg("n"), py::arg("throw_from"), py::arg("error"),
        "Test hook: parallel_for over n iterations that throw `error` from index throw_from on; returns the "
        "number of iterations that ran.");
  m.def("set_num_threads", &fr::set_num_threads, py::arg("n"), "Threads used by the C++ kernels.");
  m.def("max_threads", &fr::max_threads);
  m.def("isa", [] { return std::string(fr::isa_name(fr::active_isa())); },
        "Instruction set the kernels use now (scalar, avx2 or avx512).");
  m.def("set_isa", py::overload_cast<const std::string&>(&fr::set_isa), py::arg("name"),
        "Use the kernels of this instruction set; ValueError if unknown or this CPU lacks it.");
  m.def("isa_supported", [](const std::string& name) {
    for (fr::Isa isa : {fr::Isa::Scalar, fr::Isa::Avx2, fr::Isa::Avx512})
      if (name == fr::isa_name(isa)) return fr::cpu_supports(isa);
    throw fr::OptionError("isa_supported: unknown instruction set '" + name + "' (expected scalar, avx2 or avx512)");
  }, py::arg("name"), "Whether this CPU can run the kernels of that instruction set.");
}
