// Layer matching rules, exposed for reuse by Python-side flows. Dicts cross as JSON text.
#include <pybind11/stl.h>

#include "bindings.h"
#include "fastround/match/patterns.h"

namespace fr = fastround;

void init_match(py::module_& m) {
  m.def("pattern_to_regex", [](const std::string& p) { return fr::pattern_to_regex(p); }, py::arg("pattern"));
  m.def("ignore_pattern_to_regex", [](const std::string& p) { return fr::ignore_pattern_to_regex(p); },
        py::arg("pattern"));
  m.def("parse_ignore_layers", [](const std::string& s) { return fr::parse_ignore_layers(s); }, py::arg("csv"));
  m.def("is_always_skipped", [](const std::string& s) { return fr::is_always_skipped(s); }, py::arg("tensor_name"));
  m.def("predefined_ignore_layers",
        [](const std::string& config_json) { return fr::predefined_ignore_layers(fr::ojson::parse(config_json)); },
        py::arg("config_json"));
  m.def(
      "build_ignore_patterns",
      [](const std::string& ignore_layers, bool quant_lm_head, bool quant_nontext_module,
         const std::vector<std::string>& detected, const std::vector<std::string>& predefined,
         const std::string& layer_config_json, const std::string& scheme_name) {
        fr::IgnoreOptions o{ignore_layers, quant_lm_head, quant_nontext_module, detected, predefined};
        return fr::build_ignore_patterns(o, fr::LayerConfig::parse(fr::ojson::parse(layer_config_json), scheme_name));
      },
      py::arg("ignore_layers"), py::arg("quant_lm_head"), py::arg("quant_nontext_module"), py::arg("detected"),
      py::arg("predefined"), py::arg("layer_config_json") = "{}", py::arg("scheme_name") = "");
  py::class_<fr::IgnoreMatcher>(m, "IgnoreMatcher")
      .def(py::init<const std::vector<std::string>&>(), py::arg("patterns"))
      .def("matches", &fr::IgnoreMatcher::matches, py::arg("layer"))
      .def_property_readonly("patterns", &fr::IgnoreMatcher::patterns);
  m.def(
      "resolve_layer_scheme",
      [](const std::string& layer_config_json, const std::string& scheme_name, const std::string& default_json,
         const std::string& layer) -> py::object {
        const auto lc = fr::LayerConfig::parse(fr::ojson::parse(layer_config_json), scheme_name);
        const auto def = fr::SchemeFields::from_json(fr::ojson::parse(default_json), "default scheme");
        const auto eff = fr::resolve_layer_scheme(def, lc.match(layer));
        if (!eff) return py::none();
        return py::str(eff->to_json().dump());
      },
      py::arg("layer_config_json"), py::arg("scheme_name"), py::arg("default_scheme_json"), py::arg("layer"),
      "Effective scheme of `layer` as JSON text, or None when it stays in full precision.");
}
