// The encoding table as typed, read-only structs: what Python asks instead of deciding formats itself.
#include <pybind11/stl.h>

#include "bindings.h"
#include "fastround/quant/encoding.h"

namespace fr = fastround;

namespace {

std::vector<int> supported_bits(const fr::EncodingTraits& e) {
  std::vector<int> out;
  for (int b = 1; b < 16; ++b)
    if (e.supports_bits(b)) out.push_back(b);
  return out;
}

std::vector<std::string> strings(const std::vector<std::string_view>& v) { return {v.begin(), v.end()}; }

}  // namespace

void init_encoding(py::module_& m) {
  py::class_<fr::EncodingTraits>(m, "Encoding", "One row of the C++ encoding table (read-only).")
      .def_property_readonly("name", [](const fr::EncodingTraits& e) { return std::string(e.name); })
      .def_property_readonly("data_type", [](const fr::EncodingTraits& e) { return std::string(e.data_type); })
      .def_property_readonly("bits", &supported_bits)
      .def_property_readonly("fixed_group", [](const fr::EncodingTraits& e) { return e.fixed_group; })
      .def_property_readonly("pads_partial_groups", [](const fr::EncodingTraits& e) { return e.pads_partial_groups; })
      .def("packing_format", [](const fr::EncodingTraits& e, bool sym) { return std::string(e.packing_format(sym)); },
           py::arg("sym"))
      .def_property_readonly("model_free_formats", [](const fr::EncodingTraits& e) { return strings(e.model_free_formats); })
      .def_property_readonly("routed_formats", [](const fr::EncodingTraits& e) { return strings(e.routed_formats); })
      .def("tensors",
           [](const fr::EncodingTraits& e, int64_t rows, int64_t cols, int bits, int64_t group_size, bool sym) {
             fr::EncodingParams p;
             p.bits = bits;
             p.group_size = e.fixed_group ? e.fixed_group : group_size;
             p.sym = sym;
             std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>> out;
             for (const auto& t : e.layout(rows, cols, p, fr::DType::BF16))
               out.emplace_back(t.suffix, std::string(fr::dtype_name(t.dtype)), t.shape);
             return out;
           },
           py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group_size") = 128, py::arg("sym") = true,
           "(suffix, dtype, shape) of each tensor a [rows, cols] weight is written as.")
      .def("__repr__", [](const fr::EncodingTraits& e) { return "<fastround Encoding " + std::string(e.name) + ">"; });
  m.def("encodings", []() {
        std::vector<const fr::EncodingTraits*> out;
        for (const auto& e : fr::encodings()) out.push_back(&e);
        return out;
      },
      py::return_value_policy::reference, "Every row of the encoding table.");
  m.def("encoding_for",
        [](int bits, const std::string& data_type, const std::string& format) {
          fr::SchemeFields s;
          s.bits = bits;
          s.data_type = data_type;
          return fr::encoding_for(s, format);
        },
        py::arg("bits"), py::arg("data_type") = "int", py::arg("format") = "auto_round",
        py::return_value_policy::reference,
        "The encoding a layer of these bits and data_type is written in under `format`; None for full precision.");
}
