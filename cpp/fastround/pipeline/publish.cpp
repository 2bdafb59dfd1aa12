#include "fastround/pipeline/publish.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "fastround/common/error.h"
#include "fastround/common/strings.h"
#include "fastround/io/files.h"

namespace fastround {

namespace fs = std::filesystem;

void drop_quantization_configs(ojson& j) {
  if (j.is_object()) {
    j.erase("quantization_config");
    for (auto& [k, v] : j.items()) drop_quantization_configs(v);
  } else if (j.is_array()) {
    for (auto& v : j) drop_quantization_configs(v);
  }
}

bool is_stale_metadata(const std::string& name) {
  std::string lower = name;
  lower = to_lower(lower);
  return lower == "quantization_config.json" || lower == "quantize_config.json" || lower == "quant_config.json" ||
         lower == "readme.md";
}

bool is_weight_file(const std::string& name) {
  return ends_with(name, ".safetensors") || ends_with(name, ".bin") || ends_with(name, ".safetensors.index.json") ||
         ends_with(name, ".bin.index.json");
}

void check_output_location(const fs::path& src, const fs::path& out) {
  if (out.empty()) throw OptionError("[model_free] output_dir is empty");
  if (path_within(out, src))
    throw OptionError("[model_free] output_dir '" + out.string() + "' is the source folder '" + src.string() +
                      "' or lies inside it; the source is never written to, choose another folder");
  if (fs::exists(out) && !fs::is_directory(out))
    throw OptionError("[model_free] output_dir '" + out.string() + "' exists and is not a folder");
}

void publish(const fs::path& staging, const fs::path& out, const std::vector<std::string>& shard_files, Logger& log) {
  std::set<std::string> ours(shard_files.begin(), shard_files.end());
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string n = e.path().filename().string();
    if (e.is_regular_file() && is_stale_metadata(n) && !fs::exists(staging / n)) {
      fs::remove(e.path());
      continue;
    }
    if (e.is_regular_file() && is_weight_file(n) && !ours.count(n) && !fs::exists(staging / n)) {
      log(LogLevel::Warning, "[model_free] removing stale weight file '" + e.path().string() +
                                 "' from an earlier output so loaders do not pick it up");
      fs::remove(e.path());
    }
  }
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(staging)) entries.push_back(e.path());
  auto rank = [](const fs::path& p) {
    const std::string n = p.filename().string();
    if (n == "config.json") return 2;
    if (n == "quantization_config.json") return 1;
    return 0;
  };
  std::stable_sort(entries.begin(), entries.end(), [&](const fs::path& a, const fs::path& b) { return rank(a) < rank(b); });
  for (const auto& p : entries) {
    const fs::path dst = out / p.filename();
    if (fs::is_directory(p) && fs::exists(dst)) fs::remove_all(dst);
    fs::rename(p, dst);
  }
  fs::remove(staging);
}


}  // namespace fastround
