#include "fastround/match/patterns.h"

#include <algorithm>
#include <cctype>

#include "fastround/common/error.h"
#include "fastround/common/strings.h"

namespace fastround {

namespace {

bool has_regex_tokens(std::string_view p) {
  if (p.find(".*") != std::string_view::npos) return true;
  return p.find_first_of("^$|()[]?+") != std::string_view::npos;
}

std::string regex_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

bool ends_with_block_index(std::string_view s) {
  size_t i = s.size();
  while (i > 0 && std::isdigit(static_cast<unsigned char>(s[i - 1]))) --i;
  return i < s.size() && i > 0 && s[i - 1] == '.';
}

}  // namespace

std::string pattern_to_regex(std::string_view p) {
  if (!has_regex_tokens(p)) return ".*" + regex_escape(p) + ".*";
  std::string out;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '.' && !(i + 1 < p.size() && p[i + 1] == '*'))
      out += "\\.";
    else
      out += p[i];
  }
  if (!starts_with(out, "^") && !starts_with(out, ".*")) out = ".*" + out;
  if (!ends_with(out, "$") && !ends_with(out, ".*")) out += ".*";
  return out;
}

std::string ignore_pattern_to_regex(std::string_view p) {
  if (!ends_with(p, ".")) return pattern_to_regex(p);
  std::string base = pattern_to_regex(p.substr(0, p.size() - 1));
  if (ends_with(base, ".*")) base.resize(base.size() - 2);
  return base + "(?:\\.|$)";
}

std::string normalize_block_suffix(std::string_view p) {
  std::string s(p);
  if (ends_with_block_index(s)) s += '.';
  return s;
}

PatternMatcher::PatternMatcher(std::string pattern, bool ignore_semantics) : pattern_(std::move(pattern)) {
  const bool dot_suffix = ignore_semantics && ends_with(pattern_, ".");
  std::string_view body(pattern_);
  if (dot_suffix) body.remove_suffix(1);
  if (!has_regex_tokens(body)) {
    kind_ = dot_suffix ? Kind::SubstringThenDotOrEnd : Kind::Substring;
    literal_ = std::string(body);
    return;
  }
  try {
    re_ = std::regex(ignore_semantics ? ignore_pattern_to_regex(pattern_) : pattern_to_regex(pattern_),
                     std::regex::ECMAScript);
    kind_ = Kind::Regex;
  } catch (const std::regex_error&) {
    kind_ = Kind::Invalid;
    ok_ = false;
  }
}

bool PatternMatcher::matches(std::string_view name) const {
  switch (kind_) {
    case Kind::Substring: return name.find(literal_) != std::string_view::npos;
    case Kind::SubstringThenDotOrEnd:
      for (size_t pos = name.find(literal_); pos != std::string_view::npos; pos = name.find(literal_, pos + 1)) {
        const size_t after = pos + literal_.size();
        if (after == name.size() || name[after] == '.') return true;
      }
      return false;
    case Kind::Regex: return std::regex_search(name.begin(), name.end(), re_);
    case Kind::Invalid: return name.find(pattern_) != std::string_view::npos;  // upstream's substring fallback
  }
  return false;
}

bool is_always_skipped(std::string_view tensor_name) {
  for (std::string_view s : {"shared_expert_gate.", ".gate.", "embed", "conv"})
    if (tensor_name.find(s) != std::string_view::npos) return true;
  return false;
}

std::vector<std::string> parse_ignore_layers(std::string_view csv) {
  std::string s;
  for (char c : csv)
    if (c != ' ') s += c;
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    std::string item = s.substr(start, comma - start);
    if (!item.empty()) out.push_back(normalize_block_suffix(item));
    start = comma + 1;
  }
  return out;
}

namespace {

// More dense layers than any model has: a larger first_k_dense_replace adds patterns that match nothing.
constexpr int64_t kMaxDenseLayers = 1 << 16;

// One row per model family, in upstream's registration order; the first matching row owns the model.
struct IgnoreRule {
  enum class On { Architecture, ModelType } on;
  const char* match;               // substring of the joined architectures, or the exact model_type
  bool dense_mlps;                 // add layers.{i}.mlp for i < first_k_dense_replace (default 1)
  std::vector<const char*> layers;
};

const std::vector<IgnoreRule>& ignore_rules() {
  using On = IgnoreRule::On;
  static const std::vector<IgnoreRule> rules = {
      {On::Architecture, "Longcat", false, {"classifier"}},
      {On::Architecture, "Glm4MoeLite", true, {}},
      {On::ModelType, "glm_moe_dsa", true, {"weights_proj", "indexer"}},
      {On::ModelType, "glm5_next", true, {"weights_proj", "indexer", "self_attn"}},
      {On::ModelType, "step3p5", false, {"g_proj", "moe.gate", "eh_proj", "shared_head", "layers.45"}},
      {On::ModelType, "kimi_k25", false, {"vision_tower", "mm_projector"}},
      {On::Architecture, "Qwen4", false, {"hyper_connection", "mlp.gate", "shared_expert"}},
      {On::ModelType, "bagel", false, {"moe_gen"}},
  };
  return rules;
}

}  // namespace

std::vector<std::string> predefined_ignore_layers(const ojson& config) {
  std::string archs;
  if (config.contains("architectures") && config["architectures"].is_array())
    for (const auto& a : config["architectures"])
      if (a.is_string()) archs += (archs.empty() ? "" : ",") + a.get<std::string>();
  const std::string model_type =
      config.contains("model_type") && config["model_type"].is_string() ? config["model_type"].get<std::string>() : "";
  for (const auto& rule : ignore_rules()) {
    const bool hit = rule.on == IgnoreRule::On::Architecture ? archs.find(rule.match) != std::string::npos
                                                             : model_type == rule.match;
    if (!hit) continue;
    std::vector<std::string> out;
    if (rule.dense_mlps) {
      int k = 1;
      if (config.contains("first_k_dense_replace") && config["first_k_dense_replace"].is_number_integer())
        k = static_cast<int>(std::clamp<int64_t>(config["first_k_dense_replace"].get<int64_t>(), 0, kMaxDenseLayers));
      for (int i = 0; i < k; ++i) out.push_back("layers." + std::to_string(i) + ".mlp");
    }
    for (const char* l : rule.layers) out.emplace_back(l);
    return out;
  }
  return {};
}

LayerConfig LayerConfig::parse(const ojson& raw, const std::string& scheme_name) {
  if (!raw.is_null() && !raw.is_object())
    throw OptionError("[layer_config] expected a dict {layer pattern: scheme}, got " + raw.dump());
  std::vector<std::pair<std::string, ojson>> items;
  if (raw.is_object())
    for (const auto& [k, v] : raw.items()) items.emplace_back(k, v);
  if (to_upper(scheme_name) == "W4A16_MIXED") {
    auto has = [&](const char* k) {
      return std::any_of(items.begin(), items.end(), [&](const auto& kv) { return kv.first == k; });
    };
    if (!has("shared_expert")) items.emplace_back(".shared_expert.", ojson{{"bits", 8}, {"data_type", "int"}});
    if (!has("expert")) {
      items.emplace_back(".experts.", ojson{{"bits", 4}, {"data_type", "int"}});
      items.emplace_back(".moe.", ojson{{"bits", 4}, {"data_type", "int"}});
    }
  }
  // A key ending in a block index is re-inserted with a '.', which moves it to the end (upstream order).
  std::vector<std::pair<std::string, ojson>> ordered, moved;
  for (auto& kv : items) {
    if (ends_with_block_index(kv.first))
      moved.emplace_back(kv.first + ".", std::move(kv.second));
    else
      ordered.push_back(std::move(kv));
  }
  for (auto& kv : moved) {
    auto dup = std::find_if(ordered.begin(), ordered.end(), [&](const auto& o) { return o.first == kv.first; });
    if (dup != ordered.end()) ordered.erase(dup);
    ordered.push_back(std::move(kv));
  }
  LayerConfig lc;
  for (auto& [key, value] : ordered) {
    const std::string site = "layer_config['" + key + "']";
    SchemeFields fields;
    if (value.is_string()) {
      const SchemeFields* preset = find_preset(to_upper(value.get<std::string>()));
      if (!preset) throw OptionError("[layer_config] " + site + ": unknown scheme '" + value.get<std::string>() + "'");
      fields = *preset;
    } else if (value.is_object() && value.contains("scheme")) {
      const ojson& name = value["scheme"];
      const SchemeFields* preset = name.is_string() ? find_preset(to_upper(name.get<std::string>())) : nullptr;
      if (!preset) throw OptionError("[layer_config] " + site + ": unknown scheme " + name.dump());
      ojson rest = value;
      rest.erase("scheme");
      fields = preset->merged(SchemeFields::from_json(rest, site));
    } else if (value.is_object()) {
      fields = SchemeFields::from_json(value, site);
    } else {
      throw OptionError("[layer_config] " + site + ": expected a scheme name, a dict or a QuantizationScheme, got " +
                        value.dump());
    }
    lc.entries_.push_back(LayerOverride{key, std::move(fields), PatternMatcher(key, false)});
  }
  return lc;
}

const LayerOverride* LayerConfig::match(const std::string& layer) const {
  for (const auto& e : entries_)
    if (e.key == layer) return &e;
  for (const auto& e : entries_)
    if (e.matcher.matches(layer)) return &e;
  return nullptr;
}

bool LayerConfig::has_key(const std::string& key) const {
  return std::any_of(entries_.begin(), entries_.end(), [&](const LayerOverride& e) { return e.key == key; });
}

std::optional<SchemeFields> resolve_layer_scheme(const SchemeFields& default_scheme, const LayerOverride* entry) {
  if (!entry) return default_scheme;
  const int bits = entry->fields.bits.value_or(default_scheme.bits.value_or(16));
  if (bits >= 16) return std::nullopt;
  return default_scheme.merged(entry->fields);
}

std::vector<std::string> build_ignore_patterns(const IgnoreOptions& opt, const LayerConfig& layer_config) {
  std::vector<std::string> out = parse_ignore_layers(opt.ignore_layers);
  auto add = [&](const std::string& p) {
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  };
  if (!opt.quant_lm_head)
    for (const char* v : {"lm_head", "head", "embed_out", "output"}) {
      const std::string name(v);
      const bool configured = std::any_of(layer_config.entries().begin(), layer_config.entries().end(),
                                          [&](const LayerOverride& e) { return e.key == name || starts_with(e.key, name + "."); });
      if (!configured) add(name);
    }
  if (!opt.quant_nontext_module)
    for (const char* k : {"vision", "visual", "image", "img", "audio", "speech", "wav", "waveform"}) add(k);
  for (const auto& d : opt.detected) add(d);
  for (const auto& p : opt.predefined) add(p);
  return out;
}

IgnoreMatcher::IgnoreMatcher(const std::vector<std::string>& patterns) : patterns_(patterns) {
  for (const auto& p : patterns_) {
    PatternMatcher m(p, true);
    if (!m.compiled())
      throw OptionError("[ignore_layers] pattern '" + p + "' is not a valid regular expression (" +
                        ignore_pattern_to_regex(p) + ")");
    matchers_.push_back(std::move(m));
  }
}

bool IgnoreMatcher::matches(const std::string& layer) const {
  return std::any_of(matchers_.begin(), matchers_.end(), [&](const PatternMatcher& m) { return m.matches(layer); });
}

}  // namespace fastround
