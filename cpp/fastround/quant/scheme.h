// Quantization schemes: upstream's preset table, field merging and model-free validation. Which encoding
// (kernels, packer, tensors) a scheme is written in is quant/encoding's table.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace fastround {

using ojson = nlohmann::ordered_json;

// Mirrors upstream's QuantizationScheme; an unset field is "None".
struct SchemeFields {
  std::optional<int> bits;
  std::optional<int64_t> group_size;
  std::optional<bool> sym;
  std::optional<std::string> data_type;
  std::optional<int> act_bits;
  std::optional<int64_t> act_group_size;
  std::optional<bool> act_sym;
  std::optional<std::string> act_data_type;
  std::optional<bool> act_dynamic;
  std::optional<int> super_bits;
  std::optional<int> super_group_size;

  // Non-None fields in upstream's declaration order.
  ojson to_json() const;
  // `site` names the option in errors, e.g. "layer_config['k_proj']".
  static SchemeFields from_json(const ojson& j, const std::string& site);
  // Fields set in `over` replace ours.
  SchemeFields merged(const SchemeFields& over) const;
  bool operator==(const SchemeFields& o) const;
};

const SchemeFields* find_preset(std::string_view upper_name);
std::vector<std::string> preset_names();
std::string to_upper(std::string_view s);

// Throws OptionError when model-free cannot produce the default scheme; `label` names it.
void validate_model_free_scheme(const SchemeFields& s, const std::string& label);

}  // namespace fastround
