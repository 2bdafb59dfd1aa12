// Which layers are ignored, skipped or overridden: upstream's pattern language and matching order.
// Exposed to Python so the later (non model-free) flows reuse the same rules.
#pragma once

#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "fastround/quant/scheme.h"

namespace fastround {

// The regex upstream builds from a user pattern (python `re` syntax): plain text becomes `.*<escaped>.*`;
// with regex tokens, bare dots are escaped and `.*` added at open ends.
std::string pattern_to_regex(std::string_view pattern);
// Ignore patterns ending in '.' match the prefix followed by '.' or the end of the name.
std::string ignore_pattern_to_regex(std::string_view pattern);
// `layers.1` -> `layers.1.` (a trailing block index means "this block", not "layers.1*").
std::string normalize_block_suffix(std::string_view pattern);

// One compiled pattern; plain-text patterns use substring search (same result as the regex, faster).
class PatternMatcher {
 public:
  PatternMatcher(std::string pattern, bool ignore_semantics);
  bool matches(std::string_view name) const;
  bool compiled() const { return ok_; }
  const std::string& pattern() const { return pattern_; }

 private:
  enum class Kind { Substring, SubstringThenDotOrEnd, Regex, Invalid } kind_;
  std::string pattern_, literal_;
  std::regex re_;
  bool ok_ = true;
};

// Tensor-name substrings that upstream never quantizes, whatever the options say.
bool is_always_skipped(std::string_view tensor_name);

// User ignore_layers string -> patterns (spaces removed, split on ',', block suffix normalised).
std::vector<std::string> parse_ignore_layers(std::string_view csv);

// Ignore patterns predefined for some model types, from config.json.
std::vector<std::string> predefined_ignore_layers(const ojson& config);

struct LayerOverride {
  std::string key;      // normalised key, as written to extra_config
  SchemeFields fields;  // what the user gave (a preset expands to all its fields)
  PatternMatcher matcher;
};

class LayerConfig {
 public:
  LayerConfig() = default;
  // `raw`: ordered {key: preset name | dict of fields | dict with "scheme"}. `scheme_name`: the default
  // scheme as the user named it (W4A16_MIXED injects its expert overrides).
  static LayerConfig parse(const ojson& raw, const std::string& scheme_name);
  // Exact key first, then the first pattern in order.
  const LayerOverride* match(const std::string& layer) const;
  bool has_key(const std::string& key) const;
  const std::vector<LayerOverride>& entries() const { return entries_; }

 private:
  std::vector<LayerOverride> entries_;
};

// The effective scheme of a layer: nullopt means it stays in full precision.
std::optional<SchemeFields> resolve_layer_scheme(const SchemeFields& default_scheme, const LayerOverride* entry);

struct IgnoreOptions {
  std::string ignore_layers;              // user csv
  bool quant_lm_head = false;
  bool quant_nontext_module = false;
  std::vector<std::string> detected;      // module names found unpackable by the Python glue
  std::vector<std::string> predefined;    // from predefined_ignore_layers
};

std::vector<std::string> build_ignore_patterns(const IgnoreOptions& opt, const LayerConfig& layer_config);

class IgnoreMatcher {
 public:
  explicit IgnoreMatcher(const std::vector<std::string>& patterns);  // throws OptionError on a bad pattern
  bool matches(const std::string& layer) const;
  const std::vector<std::string>& patterns() const { return patterns_; }

 private:
  std::vector<std::string> patterns_;
  std::vector<PatternMatcher> matchers_;
};

}  // namespace fastround
