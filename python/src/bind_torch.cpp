// Thin LibTorch adapter, its own module fastround._torch: the encoding table's kernels on CPU torch tensors. The
// only file that includes torch headers; fastround._C stays free of libtorch so model-free runs never load torch.
// The regular flow's ops are registered with the dispatcher as torch.ops.fastround.* (fake kernels live in
// python/fastround/ops.py); every kernel runs without the GIL.
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "errors.h"
#include "torch_adapter.h"
#include "fastround/common/nonfinite.h"
#include "fastround/quant/codes.h"
#include "fastround/quant/encoding.h"
#include "fastround/quant/int_rtn.h"

namespace fr = fastround;
using namespace fastround_torch;

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

// ---- the regular flow's ops ----

const fr::EncodingTraits& row_named(const char* op, std::string_view name) {
  std::string names;
  for (const fr::EncodingTraits& e : fr::encodings()) {
    if (e.name == name) return e;
    names += (names.empty() ? "" : ", ") + std::string(e.name);
  }
  throw fr::OptionError(arg(op, "encoding") + "unknown '" + std::string(name) + "' (expected one of " + names + ")");
}

// The kernel parameters of (encoding, bits, group_size, sym), checked against the row.
fr::EncodingParams params_for(const char* op, const fr::EncodingTraits& e, int64_t bits, int64_t group_size, bool sym) {
  if (bits < 1 || bits > 16 || !e.supports_bits(static_cast<int>(bits)))
    throw fr::OptionError(arg(op, "bits") + std::to_string(bits) + " is not a width " + std::string(e.name) + " holds");
  if (e.fixed_group != 0 && group_size != e.fixed_group)
    throw fr::OptionError(arg(op, "group_size") + std::string(e.name) + " groups are " + std::to_string(e.fixed_group) +
                          " inputs, got " + std::to_string(group_size));
  if (e.fixed_group == 0 && group_size != -1 && group_size <= 0)
    throw fr::OptionError(arg(op, "group_size") + "must be -1 or positive, got " + std::to_string(group_size));
  fr::EncodingParams p;
  p.bits = static_cast<int>(bits);
  p.group_size = e.fixed_group ? e.fixed_group : group_size;
  p.sym = sym;
  return p;
}

bool is_int(const fr::EncodingTraits& e) { return e.fixed_group == 0; }

// Groups per row of the codes' scales: INT per upstream's grouping, FP the row's fixed group.
int64_t scale_groups(const fr::EncodingTraits& e, int64_t rows, int64_t cols, const fr::EncodingParams& p) {
  if (is_int(e)) return fr::int_grouping(rows, cols, p.group_size, "codes").groups;
  if (cols % e.fixed_group != 0)
    throw fr::OptionError("[" + std::string(e.name) + "] in_features " + std::to_string(cols) +
                          " is not a multiple of the group size " + std::to_string(e.fixed_group));
  return cols / e.fixed_group;
}

// Copies a kernel's byte buffer into a new tensor of `shape`.
at::Tensor tensor_of(const void* data, size_t nbytes, std::vector<int64_t> shape, at::ScalarType dt) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dt));
  if (nbytes) std::memcpy(t.data_ptr(), data, nbytes);
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_weight(const at::Tensor& weight, c10::string_view encoding,
                                                             int64_t bits, int64_t group_size, bool sym, bool opt_rtn,
                                                             const std::optional<at::Tensor>& imatrix) {
  return guarded([&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    constexpr const char* op = "encode_weight";
    const fr::EncodingTraits& e = row_named(op, encoding);
    require_cpu_2d(op, "weight", weight);
    const fr::DType dt = float_dtype(op, "weight", weight.scalar_type());
    const at::Tensor w = weight.contiguous();
    const int64_t rows = w.size(0), cols = w.size(1);
    fr::EncodingParams p = params_for(op, e, bits, group_size, sym);
    p.opt_rtn = opt_rtn;
    at::Tensor im;
    if (imatrix.has_value() && imatrix->defined()) {
      const at::Tensor& m = *imatrix;
      if (m.dim() != 1 || m.size(0) != cols || m.scalar_type() != at::kFloat || !m.device().is_cpu())
        throw fr::OptionError(arg(op, "imatrix") + "expected a float32 CPU tensor [" + std::to_string(cols) + "], got " +
                              std::string(c10::toString(m.scalar_type())) + " " + shape_str(m.sizes()) + " on " +
                              m.device().str());
      im = m.contiguous();
      // Plain RTN ignores the imatrix, as upstream's RTN functions do.
      if (opt_rtn && (sym || !is_int(e))) p.imatrix = im.data_ptr<float>();
    }
    fr::CodesBuffers out;
    {
      GilFree nogil;
      if (const int64_t bad = fr::count_nonfinite(dt, w.data_ptr(), rows * cols))
        throw fr::OptionError(arg(op, "weight") + std::to_string(bad) + " NaN/Inf values; refusing to quantize");
      e.encode(fr::WeightView{dt, w.data_ptr(), rows, cols}, p, out);
    }
    const int64_t groups = scale_groups(e, rows, cols, p);
    at::Tensor codes = tensor_of(out.codes.data(), out.codes.size(), {rows, cols}, at::kByte);
    at::Tensor scales = tensor_of(out.scales.data(), out.scales.size(), {rows, groups}, torch_dtype(out.scale_dtype));
    at::Tensor zeros = is_int(e) ? tensor_of(out.zeros.data(), out.zeros.size() * 4, {rows, groups}, at::kInt)
                                 : at::empty({0}, at::TensorOptions().dtype(at::kInt));
    return {codes, scales, zeros};
  });
}

// Unpacked codes checked against the row: codes [rows, cols] uint8 below 2^bits (E2M1 nibbles below 16), scales
// [rows, G] (INT float16 / bfloat16 / float32, FP uint8), zeros [rows, G] int32 for INT, absent for FP.
struct CheckedCodes {
  at::Tensor codes, scales, zeros;
  fr::CodesView view;
};

CheckedCodes checked_codes(const char* op, const fr::EncodingTraits& e, const fr::EncodingParams& p,
                           const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros) {
  require_cpu_2d(op, "codes", codes);
  if (codes.scalar_type() != at::kByte)
    throw fr::OptionError(arg(op, "codes") + "dtype must be uint8, got " + std::string(c10::toString(codes.scalar_type())));
  const int64_t rows = codes.size(0), cols = codes.size(1);
  const int64_t groups = scale_groups(e, rows, cols, p);
  CheckedCodes c;
  c.codes = codes.contiguous();
  const int limit = is_int(e) ? (1 << p.bits) : (p.bits == 4 ? 16 : 256);
  if (limit < 256 && c.codes.max().item<uint8_t>() >= limit)
    throw fr::OptionError(arg(op, "codes") + "values must be below " + std::to_string(limit) + " for " +
                          std::string(e.name) + " bits=" + std::to_string(p.bits));
  require_cpu_2d(op, "scales", scales);
  const bool scale_ok = is_int(e) ? (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16 ||
                                     scales.scalar_type() == at::kFloat)
                                  : scales.scalar_type() == at::kByte;
  if (!scale_ok || scales.size(0) != rows || scales.size(1) != groups)
    throw fr::OptionError(arg(op, "scales") + "expected " + (is_int(e) ? "float16/bfloat16/float32" : "uint8") + " [" +
                          std::to_string(rows) + ", " + std::to_string(groups) + "], got " +
                          std::string(c10::toString(scales.scalar_type())) + " " + shape_str(scales.sizes()));
  c.scales = scales.contiguous();
  const bool has_zeros = zeros.has_value() && zeros->defined() && zeros->numel() > 0;
  if (is_int(e)) {
    if (!has_zeros || zeros->dim() != 2 || zeros->size(0) != rows || zeros->size(1) != groups ||
        zeros->scalar_type() != at::kInt || !zeros->device().is_cpu())
      throw fr::OptionError(arg(op, "zeros") + "expected int32 CPU [" + std::to_string(rows) + ", " +
                            std::to_string(groups) + "] zero points");
    c.zeros = zeros->contiguous();
  } else if (has_zeros) {
    throw fr::OptionError(arg(op, "zeros") + std::string(e.name) + " has no zero points; pass None");
  }
  c.view = fr::CodesView{rows, cols, c.codes.data_ptr<uint8_t>(), c.scales.data_ptr(),
                         c.zeros.defined() ? c.zeros.data_ptr<int32_t>() : nullptr,
                         is_int(e) ? float_dtype(op, "scales", c.scales.scalar_type()) : fr::DType::U8};
  return c;
}

fr::EncodingParams pack_params(const char* op, const fr::EncodingTraits& e, int64_t bits, int64_t group_size, bool sym,
                               int64_t zero_offset, bool pad_partial_groups, bool from_qdq = false) {
  fr::EncodingParams p = params_for(op, e, bits, group_size, sym);
  const bool gptq = e.id == fr::Encoding::IntGptq;
  if (gptq ? (zero_offset != 0 && zero_offset != 1) : zero_offset != 0)
    throw fr::OptionError(arg(op, "zero_offset") + (gptq ? "must be 0 or 1" : "must be 0 for " + std::string(e.name)) +
                          ", got " + std::to_string(zero_offset));
  p.zero_offset = static_cast<int>(zero_offset);
  p.pad_partial_groups = pad_partial_groups;
  p.from_qdq = from_qdq;
  return p;
}

std::vector<at::Tensor> pack_codes(const at::Tensor& codes, const at::Tensor& scales,
                                   const std::optional<at::Tensor>& zeros, c10::string_view encoding, int64_t bits,
                                   int64_t group_size, bool sym, int64_t zero_offset, bool pad_partial_groups,
                                   bool from_qdq) {
  return guarded([&]() -> std::vector<at::Tensor> {
    constexpr const char* op = "pack_codes";
    const fr::EncodingTraits& e = row_named(op, encoding);
    const fr::EncodingParams p = pack_params(op, e, bits, group_size, sym, zero_offset, pad_partial_groups, from_qdq);
    const CheckedCodes c = checked_codes(op, e, p, codes, scales, zeros);
    std::vector<at::Tensor> outs;
    std::vector<void*> ptrs;
    for (const fr::TensorSpec& s : e.layout(c.view.rows, c.view.cols, p, fr::DType::F16)) {
      outs.push_back(at::empty(s.shape, at::TensorOptions().dtype(torch_dtype(s.dtype))));
      ptrs.push_back(outs.back().data_ptr());
    }
    GilFree nogil;
    e.pack(c.view, p, ptrs.data());
    return outs;
  });
}

at::Tensor dequantize_codes(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                            c10::string_view encoding, int64_t bits, int64_t group_size, bool sym, at::ScalarType dtype,
                            const std::optional<at::Tensor>& weight) {
  return guarded([&]() -> at::Tensor {
    constexpr const char* op = "dequantize_codes";
    const fr::EncodingTraits& e = row_named(op, encoding);
    const fr::EncodingParams p = params_for(op, e, bits, group_size, sym);
    const fr::DType out_dt = float_dtype(op, "dtype", dtype);
    const CheckedCodes c = checked_codes(op, e, p, codes, scales, zeros);
    at::Tensor src;
    fr::WeightView source;
    if (weight.has_value() && weight->defined()) {
      require_cpu_2d(op, "weight", *weight);
      if (weight->size(0) != c.view.rows || weight->size(1) != c.view.cols)
        throw fr::OptionError(arg(op, "weight") + "shape " + shape_str(weight->sizes()) + " does not match codes " +
                              shape_str(codes.sizes()));
      src = weight->contiguous();
      source = fr::WeightView{float_dtype(op, "weight", src.scalar_type()), src.data_ptr(), src.size(0), src.size(1)};
    }
    at::Tensor out = at::empty({c.view.rows, c.view.cols}, at::TensorOptions().dtype(dtype));
    GilFree nogil;
    e.dequantize_codes(c.view, p, src.defined() ? &source : nullptr, out_dt, out.data_ptr());
    return out;
  });
}

// A checkpoint's packed tensors back to the float weight [rows, cols] (float32): the row's dequantize_ref, the
// inverse of pack_codes with pad_partial_groups=true (callers pad the regular flow's unpadded GPTQ prefixes).
// Loading reads checkpoints through it, so each tensor is checked against the layout before the kernel runs.
at::Tensor dequantize_packed(const std::vector<at::Tensor>& packed, c10::string_view encoding, int64_t rows,
                             int64_t cols, int64_t bits, int64_t group_size, bool sym, int64_t zero_offset) {
  return guarded([&]() -> at::Tensor {
    constexpr const char* op = "dequantize_packed";
    const fr::EncodingTraits& e = row_named(op, encoding);
    const fr::EncodingParams p = pack_params(op, e, bits, group_size, sym, zero_offset, true);
    const std::vector<fr::TensorSpec> specs = e.layout(rows, cols, p, fr::DType::F16);
    if (packed.size() != specs.size())
      throw fr::OptionError(arg(op, "packed") + std::string(e.name) + " has " + std::to_string(specs.size()) +
                            " tensors, got " + std::to_string(packed.size()));
    std::vector<at::Tensor> ins;
    std::vector<const void*> ptrs;
    for (size_t i = 0; i < specs.size(); ++i) {
      const fr::TensorSpec& s = specs[i];
      const at::Tensor& t = packed[i];
      if (!t.defined() || !t.device().is_cpu() || t.scalar_type() != torch_dtype(s.dtype) ||
          t.sizes() != at::IntArrayRef(s.shape))
        throw fr::OptionError(arg(op, s.suffix.c_str()) + "expected a CPU " + std::string(fr::dtype_name(s.dtype)) +
                              " tensor " + shape_str(s.shape) + ", got " +
                              (t.defined() ? std::string(c10::toString(t.scalar_type())) + " " + shape_str(t.sizes()) +
                                                 " on " + t.device().str()
                                           : std::string("None")));
      ins.push_back(t.contiguous());
      ptrs.push_back(ins.back().data_ptr());
    }
    at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
    GilFree nogil;
    e.dequantize_ref(ptrs.data(), rows, cols, p, out.data_ptr<float>());
    return out;
  });
}

// (suffix, dtype name, shape) of each tensor pack_codes returns, in order: its names and its fake kernel's shapes.
std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>> packed_tensors(
    const std::string& encoding, int64_t rows, int64_t cols, int64_t bits, int64_t group_size, bool sym,
    int64_t zero_offset, bool pad_partial_groups) {
  constexpr const char* op = "pack_codes";
  const fr::EncodingTraits& e = row_named(op, encoding);
  const fr::EncodingParams p = pack_params(op, e, bits, group_size, sym, zero_offset, pad_partial_groups);
  std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>> out;
  for (const fr::TensorSpec& s : e.layout(rows, cols, p, fr::DType::F16))
    out.emplace_back(s.suffix, std::string(fr::dtype_name(s.dtype)), s.shape);
  return out;
}

}  // namespace

TORCH_LIBRARY(fastround, m) {
  m.def("encode_weight(Tensor weight, str encoding, int bits, int group_size, bool sym, bool opt_rtn, "
        "Tensor? imatrix=None) -> (Tensor, Tensor, Tensor)");
  m.def("pack_codes(Tensor codes, Tensor scales, Tensor? zeros, str encoding, int bits, int group_size, bool sym, "
        "int zero_offset, bool pad_partial_groups, bool from_qdq=False) -> Tensor[]");
  m.def("dequantize_codes(Tensor codes, Tensor scales, Tensor? zeros, str encoding, int bits, int group_size, "
        "bool sym, ScalarType dtype, Tensor? weight=None) -> Tensor");
  m.def("dequantize_packed(Tensor[] packed, str encoding, int rows, int cols, int bits, int group_size, bool sym, "
        "int zero_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastround, CPU, m) {
  m.impl("encode_weight", TORCH_FN(encode_weight));
  m.impl("pack_codes", TORCH_FN(pack_codes));
  m.impl("dequantize_codes", TORCH_FN(dequantize_codes));
  m.impl("dequantize_packed", TORCH_FN(dequantize_packed));
}

PYBIND11_MODULE(_torch, m) {
  m.doc() = "fastround LibTorch adapters (the regular flow's ops are torch.ops.fastround.*)";
  fastround_py::register_error_translator(py::module_::import("fastround._C").attr("CheckpointError"));
  m.def("quantize_int_gptq_tensor", &quantize_int_gptq_tensor, py::arg("weight"), py::arg("bits"),
        py::arg("group_size"), py::arg("sym"), py::arg("zero_offset") = 1,
        "RTN-quantize a torch weight [out, in] and pack it as auto_gptq: (qweight, qzeros, scales fp16).");
  m.def("packed_tensors", &packed_tensors, py::arg("encoding"), py::arg("rows"), py::arg("cols"), py::arg("bits"),
        py::arg("group_size"), py::arg("sym"), py::arg("zero_offset"), py::arg("pad_partial_groups"),
        "(suffix, dtype, shape) of each tensor pack_codes returns for a [rows, cols] weight, in order.");
#ifdef FASTROUND_WITH_CUDA
  constexpr bool with_cuda = true;
#else
  constexpr bool with_cuda = false;
#endif
  m.def("with_cuda", []() { return with_cuda; },
        "Whether the tuning ops have CUDA implementations (built against a CUDA torch with nvcc).");
}
