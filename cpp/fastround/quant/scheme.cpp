#include "fastround/quant/scheme.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <sstream>

#include "fastround/common/error.h"
#include "fastround/quant/encoding.h"

namespace fastround {

namespace {

SchemeFields int_preset(int bits, int64_t group) {
  SchemeFields s;
  s.bits = bits;
  s.group_size = group;
  s.sym = true;
  s.data_type = "int";
  s.act_bits = 16;
  return s;
}

SchemeFields full_preset(int bits, int64_t group, const char* dt, int abits, std::optional<int64_t> agroup,
                         const char* adt, std::optional<bool> adyn) {
  SchemeFields s;
  s.bits = bits;
  s.group_size = group;
  s.sym = true;
  s.data_type = dt;
  s.act_bits = abits;
  s.act_group_size = agroup;
  if (agroup) s.act_sym = true;
  s.act_data_type = adt;
  s.act_dynamic = adyn;
  return s;
}

SchemeFields gguf_preset(int bits, int64_t group, bool sym, const char* dt, std::optional<int> sbits,
                         std::optional<int> sgroup) {
  SchemeFields s = int_preset(bits, group);
  s.sym = sym;
  s.data_type = dt;
  s.super_bits = sbits;
  s.super_group_size = sgroup;
  return s;
}

// upstream auto_round 0.16.1 schemes.PRESET_SCHEMES, in its order.
const std::vector<std::pair<std::string, SchemeFields>>& presets() {
  static const auto table = [] {
    std::vector<std::pair<std::string, SchemeFields>> t;
    for (int b : {4, 2, 3, 5, 6, 7, 8}) t.emplace_back("W" + std::to_string(b) + "A16", int_preset(b, 128));
    t.emplace_back("MXFP4", full_preset(4, 32, "mx_fp", 4, 32, "mx_fp", true));
    t.emplace_back("MXFP6", full_preset(6, 32, "mx_fp", 6, 32, "mx_fp", true));
    t.emplace_back("MXFP4_RCEIL", full_preset(4, 32, "mx_fp", 4, 32, "mx_fp_rceil", true));
    t.emplace_back("MXFP8", full_preset(8, 32, "mx_fp", 8, 32, "mx_fp", true));
    t.emplace_back("MXFP8_RCEIL", full_preset(8, 32, "mx_fp", 8, 32, "mx_fp_rceil", true));
    t.emplace_back("NVFP4", full_preset(4, 16, "nv_fp", 4, 16, "nv_fp4_with_static_gs", true));
    t.emplace_back("NVFP4_E5M3", full_preset(4, 16, "nvfp4_v2", 4, 16, "nvfp4_v2", std::nullopt));
    {
      SchemeFields s = full_preset(8, 0, "fp", 16, std::nullopt, "fp", std::nullopt);
      t.emplace_back("FPW8A16", s);
    }
    for (int b : {2, 3, 4, 5, 6, 7, 8})
      for (int g : {64, 32})
        t.emplace_back("W" + std::to_string(b) + "A16G" + std::to_string(g), int_preset(b, g));
    t.emplace_back("FP8_STATIC", full_preset(8, -1, "fp", 8, 0, "fp", false));
    t.emplace_back("BF16", full_preset(16, 128, "fp", 16, std::nullopt, "fp", std::nullopt));
    t.emplace_back("W4A16_MIXED", int_preset(4, 128));
    t.emplace_back("INT4", full_preset(4, -1, "int", 4, -1, "int", true));
    t.emplace_back("INT8", full_preset(8, -1, "int", 8, -1, "int", true));
    t.emplace_back("INT8_W8A8", full_preset(8, -1, "int", 8, -1, "int", true));
    // FP8_BLOCK's weight group is the 2-D block (128, 128); only its rejection matters here.
    t.emplace_back("FP8_BLOCK", full_preset(8, 128, "fp", 8, 128, "fp", true));
    t.emplace_back("MXINT4", full_preset(4, 32, "mx_int", 4, 32, "mx_int", true));
    t.emplace_back("GGUF:Q4_0", gguf_preset(4, 32, true, "int", std::nullopt, std::nullopt));
    t.emplace_back("GGUF:Q4_1", gguf_preset(4, 32, false, "int_asym_float_zp", std::nullopt, std::nullopt));
    t.emplace_back("GGUF:Q5_0", gguf_preset(5, 32, true, "int", std::nullopt, std::nullopt));
    t.emplace_back("GGUF:Q5_1", gguf_preset(5, 32, false, "int_asym_float_zp", std::nullopt, std::nullopt));
    t.emplace_back("GGUF:Q2_K_S", gguf_preset(2, 16, false, "int_asym_dq", 4, 16));
    t.emplace_back("GGUF:Q2_K_MIXED", gguf_preset(2, 16, false, "int_asym_dq", 4, 16));
    for (const char* n : {"GGUF:Q3_K_S", "GGUF:Q3_K_M", "GGUF:Q3_K_L"})
      t.emplace_back(n, gguf_preset(3, 16, true, "int_sym_dq", 6, 16));
    for (const char* n : {"GGUF:Q4_K_S", "GGUF:Q4_K_M"}) t.emplace_back(n, gguf_preset(4, 32, false, "int_asym_dq", 6, 8));
    for (const char* n : {"GGUF:Q5_K_S", "GGUF:Q5_K_M"}) t.emplace_back(n, gguf_preset(5, 32, false, "int_asym_dq", 6, 8));
    t.emplace_back("GGUF:Q6_K", gguf_preset(6, 16, true, "int_sym_dq", 8, 16));
    t.emplace_back("GGUF:Q8_0", gguf_preset(8, 32, true, "int", std::nullopt, std::nullopt));
    return t;
  }();
  return table;
}

template <typename T>
void put(ojson& j, const char* key, const std::optional<T>& v) {
  if (v) j[key] = *v;
}

template <typename T>
std::optional<T> take(const ojson& j, const char* key, const std::string& site) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  try {
    if constexpr (std::is_same_v<T, bool>) {
      if (!it->is_boolean()) throw OptionError("");
    } else if constexpr (std::is_integral_v<T>) {
      if (!it->is_number_integer() && !it->is_boolean()) throw OptionError("");
    } else {
      if (!it->is_string()) throw OptionError("");
    }
    return it->get<T>();
  } catch (const std::exception&) {
    throw OptionError("[scheme] " + site + ": field '" + key + "' has an invalid value " + it->dump());
  }
}

}  // namespace

std::string to_upper(std::string_view s) {
  std::string r(s);
  std::transform(r.begin(), r.end(), r.begin(), [](unsigned char c) { return std::toupper(c); });
  return r;
}

ojson SchemeFields::to_json() const {
  ojson j = ojson::object();
  put(j, "bits", bits);
  put(j, "group_size", group_size);
  put(j, "sym", sym);
  put(j, "data_type", data_type);
  put(j, "act_bits", act_bits);
  put(j, "act_group_size", act_group_size);
  put(j, "act_sym", act_sym);
  put(j, "act_data_type", act_data_type);
  put(j, "act_dynamic", act_dynamic);
  put(j, "super_bits", super_bits);
  put(j, "super_group_size", super_group_size);
  return j;
}

SchemeFields SchemeFields::from_json(const ojson& j, const std::string& site) {
  if (!j.is_object()) throw OptionError("[scheme] " + site + ": expected a dict of scheme fields, got " + j.dump());
  static const char* known[] = {"bits",           "group_size",    "sym",         "data_type",
                                "act_bits",       "act_group_size", "act_sym",     "act_data_type",
                                "act_dynamic",    "super_bits",     "super_group_size"};
  for (const auto& [k, v] : j.items()) {
    if (std::find_if(std::begin(known), std::end(known), [&](const char* n) { return k == n; }) == std::end(known))
      throw OptionError("[scheme] " + site + ": unknown scheme field '" + k + "'");
  }
  SchemeFields s;
  s.bits = take<int>(j, "bits", site);
  s.group_size = take<int64_t>(j, "group_size", site);
  s.sym = take<bool>(j, "sym", site);
  s.data_type = take<std::string>(j, "data_type", site);
  s.act_bits = take<int>(j, "act_bits", site);
  s.act_group_size = take<int64_t>(j, "act_group_size", site);
  s.act_sym = take<bool>(j, "act_sym", site);
  s.act_data_type = take<std::string>(j, "act_data_type", site);
  s.act_dynamic = take<bool>(j, "act_dynamic", site);
  s.super_bits = take<int>(j, "super_bits", site);
  s.super_group_size = take<int>(j, "super_group_size", site);
  return s;
}

SchemeFields SchemeFields::merged(const SchemeFields& o) const {
  SchemeFields r = *this;
  if (o.bits) r.bits = o.bits;
  if (o.group_size) r.group_size = o.group_size;
  if (o.sym) r.sym = o.sym;
  if (o.data_type) r.data_type = o.data_type;
  if (o.act_bits) r.act_bits = o.act_bits;
  if (o.act_group_size) r.act_group_size = o.act_group_size;
  if (o.act_sym) r.act_sym = o.act_sym;
  if (o.act_data_type) r.act_data_type = o.act_data_type;
  if (o.act_dynamic) r.act_dynamic = o.act_dynamic;
  if (o.super_bits) r.super_bits = o.super_bits;
  if (o.super_group_size) r.super_group_size = o.super_group_size;
  return r;
}

bool SchemeFields::operator==(const SchemeFields& o) const { return to_json() == o.to_json(); }

const SchemeFields* find_preset(std::string_view upper_name) {
  for (const auto& [name, fields] : presets())
    if (name == upper_name) return &fields;
  return nullptr;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& p : presets()) names.push_back(p.first);
  return names;
}

void validate_model_free_scheme(const SchemeFields& s, const std::string& label) {
  const int bits = s.bits.value_or(16);
  const int act_bits = s.act_bits.value_or(16);
  const std::string dt = s.data_type.value_or("int");
  const std::string supported =
      "supported: W2A16, W2A16G32, W2A16G64, W4A16, W4A16G32, W4A16G64, W4A16_MIXED, W8A16, W8A16G32, W8A16G64, "
      "MXFP4, MXFP8, NVFP4_E5M3, BF16, or a custom scheme with data_type='int', bits in (2, 4, 8), act_bits >= 16, "
      "sym or asym, any group_size (-1 = per output channel)";
  if (label.rfind("GGUF:", 0) == 0)
    throw OptionError("[model_free] scheme '" + label + "' is a GGUF scheme, which model-free mode does not produce; " +
                      supported);
  if (bits >= 16 && act_bits >= 16) return;
  const bool preset = label.rfind("custom ", 0) != 0;
  if (dt.find("mx_fp") != std::string::npos) {
    const std::string adt = s.act_data_type.value_or("mx_fp");
    if (adt != "mx_fp")
      throw OptionError("[model_free] scheme '" + label + "': model-free MXFP supports only act_data_type='mx_fp', got '" +
                        adt + "'");
    if (preset && label != "MXFP4" && label != "MXFP8")
      throw OptionError("[model_free] scheme '" + label +
                        "': model-free mode only supports the MXFP presets 'MXFP4' and 'MXFP8'; " + supported);
    if (bits != 4 && bits != 8)
      throw OptionError("[model_free] scheme '" + label + "': model-free MXFP supports bits in (4, 8), got bits=" +
                        std::to_string(bits));
    if (s.group_size && *s.group_size != 32)
      throw OptionError("[model_free] scheme '" + label + "': model-free MXFP needs group_size=32, got " +
                        std::to_string(*s.group_size));
    return;
  }
  if (dt == "nvfp4_v2") {
    if (bits != 4 || s.group_size.value_or(0) != 16 || act_bits != 4 || s.act_data_type.value_or("") != "nvfp4_v2" ||
        s.act_group_size.value_or(0) != 16)
      throw OptionError("[model_free] scheme '" + label +
                        "': model-free NVFP4_E5M3 requires bits=4, group_size=16, act_bits=4, "
                        "act_data_type='nvfp4_v2' and act_group_size=16");
    return;
  }
  if (dt.find("nv_fp") != std::string::npos)
    throw OptionError("[model_free] scheme '" + label + "' (data_type='" + dt +
                      "') is not supported by model-free mode (NVFP4 needs calibrated global scales); " + supported);
  if (act_bits < 16)
    throw OptionError("[model_free] scheme '" + label +
                      "': model-free mode only supports weight-only quantization (WOQ) schemes where act_bits >= 16, got "
                      "act_bits=" + std::to_string(act_bits) + "; " + supported);
  if (dt != "int")
    throw OptionError("[model_free] scheme '" + label +
                      "': model-free mode only supports integer weight quantization (data_type='int'), got data_type='" +
                      dt + "'; " + supported);
  if (!encoding(Encoding::IntGptq).supports_bits(bits))
    throw OptionError("[model_free] scheme '" + label + "': model-free INT supports bits in (2, 4, 8), got bits=" +
                      std::to_string(bits) + "; " + supported);
  const int64_t g = s.group_size.value_or(128);
  if (g == 0 || g < -1)
    throw OptionError("[model_free] scheme '" + label + "': group_size must be -1 (per channel) or positive, got " +
                      std::to_string(g));
}

}  // namespace fastround
