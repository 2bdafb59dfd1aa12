#include "fastround/pipeline/model_free.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <set>
#include <thread>

#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/io/files.h"
#include "fastround/io/safetensors.h"
#include "fastround/match/patterns.h"
#include "fastround/pipeline/quant_config.h"
#include "fastround/pipeline/resume.h"
#include "fastround/pipeline/shard_plan.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStagingDir = ".fastround-partial";
constexpr const char* kDownloadDir = "source-shards";  // inside the staging folder
constexpr const char* kSummaryFile = "fastround_summary.json";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ---- source discovery -------------------------------------------------------------------------

}  // namespace

std::optional<fs::path> find_weight_index(const fs::path& src) {
  std::vector<fs::path> index_files;
  for (const auto& e : fs::directory_iterator(src))
    if (e.is_regular_file() && ends_with(e.path().filename().string(), ".safetensors.index.json"))
      index_files.push_back(e.path());
  if (index_files.empty()) return std::nullopt;
  if (fs::exists(src / "model.safetensors.index.json")) return src / "model.safetensors.index.json";
  std::sort(index_files.begin(), index_files.end());
  return index_files.front();
}

std::vector<std::string> indexed_shards(const fs::path& src) {
  std::vector<std::string> shards;
  if (const auto index = find_weight_index(src)) {
    const ojson j = read_json_file(*index);
    if (j.contains("weight_map") && j["weight_map"].is_object())
      for (const auto& [tensor, file] : j["weight_map"].items())
        if (file.is_string() && std::find(shards.begin(), shards.end(), file.get<std::string>()) == shards.end())
          shards.push_back(file.get<std::string>());
  }
  return shards;
}

namespace {

// `remote`: shard files of a streamed hub repo, fetched on demand (empty for a local folder).
// `homes` receives tensor -> shard from the index (empty without one).
std::vector<std::string> discover_shards(const fs::path& src, const std::vector<std::string>& remote,
                                         std::map<std::string, std::string>* homes) {
  std::vector<fs::path> weight_files, bin_files;
  for (const auto& e : fs::directory_iterator(src)) {
    if (!e.is_regular_file()) continue;
    const std::string n = e.path().filename().string();
    if (ends_with(n, ".safetensors")) weight_files.push_back(e.path());
    if (ends_with(n, ".bin")) bin_files.push_back(e.path());
  }
  std::sort(weight_files.begin(), weight_files.end());
  std::vector<std::string> shards;
  if (const auto index = find_weight_index(src)) {
    const ojson j = read_json_file(*index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw CheckpointError("[model_free] index '" + index->string() + "' has no weight_map object");
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string())
        throw CheckpointError("[model_free] index '" + index->string() + "': tensor '" + tensor +
                              "' maps to a non-string " + file.dump());
      const std::string f = file.get<std::string>();
      if (f.empty() || fs::path(f).is_absolute() || f.find("..") != std::string::npos || f.find('/') != std::string::npos)
        throw CheckpointError("[model_free] index '" + index->string() + "': tensor '" + tensor + "' maps to '" + f +
                              "', which is not a file name inside '" + src.string() + "'");
      if (std::find(shards.begin(), shards.end(), f) == shards.end()) shards.push_back(f);
      if (homes) (*homes)[tensor] = f;
    }
    for (const auto& f : shards)
      if (!fs::is_regular_file(src / f) && std::find(remote.begin(), remote.end(), f) == remote.end())
        throw MissingPathError("[model_free] shard '" + f + "' listed in '" + index->filename().string() +
                               "' is missing from '" + src.string() + "'");
    return shards;
  }
  for (const auto& w : weight_files) shards.push_back(w.filename().string());
  for (const auto& r : remote)
    if (ends_with(r, ".safetensors") && std::find(shards.begin(), shards.end(), r) == shards.end()) shards.push_back(r);
  std::sort(shards.begin(), shards.end());
  if (shards.empty()) {
    if (!bin_files.empty())
      throw OptionError("[model_free] '" + src.string() +
                        "' holds only PyTorch .bin weights; fastround model-free reads *.safetensors shards "
                        "(convert them with transformers' save_pretrained(safe_serialization=True))");
    throw MissingPathError("[model_free] no *.safetensors weight files in '" + src.string() + "'");
  }
  return shards;
}

// ---- shard order and source files --------------------------------------------------------------

// Shards that hold an FP8 scale for a weight elsewhere run first (donors before recipients, otherwise
// source order), so a recipient finds its scale; returns recipient -> donors.
std::map<std::string, std::set<std::string>> order_for_donors(std::vector<std::string>& shards,
                                                              const std::map<std::string, std::string>& homes,
                                                              Logger& log) {
  std::map<std::string, std::set<std::string>> donors;
  const std::string suffix = ".weight_scale_inv";
  for (const auto& [tensor, donor] : homes) {
    if (!ends_with(tensor, suffix)) continue;
    auto w = homes.find(tensor.substr(0, tensor.size() - suffix.size()) + ".weight");
    if (w != homes.end() && w->second != donor) donors[w->second].insert(donor);
  }
  if (donors.empty()) return donors;
  std::map<std::string, size_t> pos;
  for (size_t i = 0; i < shards.size(); ++i) pos[shards[i]] = i;
  std::map<std::string, int> indegree;
  std::map<std::string, std::vector<std::string>> after;
  for (const auto& [recipient, ds] : donors)
    for (const auto& d : ds) {
      if (!pos.count(d) || !pos.count(recipient)) continue;
      ++indegree[recipient];
      after[d].push_back(recipient);
    }
  auto by_pos = [&](const std::string& a, const std::string& b) { return pos[a] > pos[b]; };
  std::priority_queue<std::string, std::vector<std::string>, decltype(by_pos)> ready(by_pos);
  for (const auto& s : shards)
    if (indegree[s] == 0) ready.push(s);
  std::vector<std::string> ordered;
  std::set<std::string> placed;
  while (!ready.empty()) {
    const std::string s = ready.top();
    ready.pop();
    ordered.push_back(s);
    placed.insert(s);
    for (const auto& r : after[s])
      if (--indegree[r] == 0) ready.push(r);
  }
  if (ordered.size() != shards.size()) {
    log(LogLevel::Warning, "[model_free] FP8 scale donations between shards form a cycle; keeping source order for the rest");
    for (const auto& s : shards)
      if (!placed.count(s)) ordered.push_back(s);
  }
  shards = ordered;
  return donors;
}

// Opens source shards, fetching streamed ones through the callback, and lets each go once every shard
// that needs it (itself, and recipients of its scales) has finished.
class ShardStore {
 public:
  ShardStore(fs::path src, fs::path download_dir, const ModelFreeCallbacks& cb)
      : src_(std::move(src)), download_dir_(std::move(download_dir)), cb_(cb) {}

  void pin(const std::string& shard) {
    std::lock_guard<std::mutex> lock(mu_);
    ++pins_[shard];
  }

  std::shared_ptr<SafetensorsReader> open(const std::string& shard, const std::vector<std::string>& upcoming) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = open_.find(shard);
      if (it != open_.end()) return it->second;
    }
    fs::path path = src_ / shard;
    if (!fs::is_regular_file(path)) {
      if (!cb_.fetch_shard)
        throw MissingPathError("[model_free] shard '" + shard + "' is missing from '" + src_.string() + "'");
      fs::create_directories(download_dir_);
      path = cb_.fetch_shard(shard, download_dir_.string(), upcoming);
      if (path.empty() || !fs::is_regular_file(path))
        throw MissingPathError("[model_free] fetching shard '" + shard + "' gave no file (got '" + path.string() + "')");
      std::lock_guard<std::mutex> lock(mu_);
      fetched_.insert(shard);
    }
    auto reader = std::make_shared<SafetensorsReader>(path);
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, fresh] = open_.emplace(shard, reader);
    return it->second;
  }

  void unpin(const std::string& shard) {
    bool release = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pins_[shard] > 0) return;
      open_.erase(shard);
      release = fetched_.erase(shard) > 0;
    }
    if (release && cb_.release_shard) cb_.release_shard(shard);
  }

 private:
  fs::path src_, download_dir_;
  const ModelFreeCallbacks& cb_;
  std::mutex mu_;
  std::map<std::string, int> pins_;
  std::map<std::string, std::shared_ptr<SafetensorsReader>> open_;
  std::set<std::string> fetched_;
};

// ---- parallelism ------------------------------------------------------------------------------------

uint64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 8ull << 30;
}

// Shards in flight: asked for, else as many as a quarter of free RAM holds at ~3x the largest tensor
// each (mapped input pages, output buffers, a dequantized copy), at most one per two cores.
int choose_parallelism(const ModelFreeJob& job, size_t shard_count, uint64_t largest_tensor, Logger& log) {
  int p = job.shard_parallelism;
  if (p <= 0) {
    const uint64_t per_worker = 3 * std::max<uint64_t>(largest_tensor, 64ull << 20) + (64ull << 20);
    const uint64_t by_memory = available_memory_bytes() / 4 / per_worker;
    p = static_cast<int>(std::min<uint64_t>(by_memory, static_cast<uint64_t>(std::max(1, max_threads() / 2))));
  }
  p = std::max(1, std::min<int>(p, static_cast<int>(std::max<size_t>(shard_count, 1))));
  log(LogLevel::Debug, "[model_free] " + std::to_string(p) + " shard(s) in flight");
  return p;
}

// ---- output folder ------------------------------------------------------------------------------

void drop_quantization_configs(ojson& j) {
  if (j.is_object()) {
    j.erase("quantization_config");
    for (auto& [k, v] : j.items()) drop_quantization_configs(v);
  } else if (j.is_array()) {
    for (auto& v : j) drop_quantization_configs(v);
  }
}

// Quantization metadata of another tool, or a model card describing the unquantized model.
bool is_stale_metadata(const std::string& name) {
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
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

// Moves finished files from the staging folder into place; config.json last, so a folder that has
// our config.json is complete.
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


// Upstream's format gate, from the encoding table: auto_round and auto_round:auto_gptq always, plus what each
// encoding of the run accepts. A full-precision default takes the encodings of its layer_config overrides.
void check_model_free_format(const std::string& fmt, const SchemeFields& scheme, const LayerConfig& lc,
                             const std::string& given) {
  std::vector<const EncodingTraits*> used = {&encoding(Encoding::IntGptq), encoding_for(scheme)};
  if (scheme.bits.value_or(16) >= 16)
    for (const auto& e : lc.entries()) {
      try {
        used.push_back(encoding_for(scheme.merged(e.fields)));
      } catch (const OptionError&) {
        // An override no encoding serves fails later, naming its layer.
      }
    }
  std::vector<std::string_view> ok;
  for (const EncodingTraits* enc : used) {
    if (!enc) continue;
    if (enc->accepts_model_free_format(fmt)) return;
    for (auto f : enc->model_free_formats)
      if (std::find(ok.begin(), ok.end(), f) == ok.end()) ok.push_back(f);
  }
  std::string list;
  for (const auto& f : ok) list += (list.empty() ? "'" : ", '") + std::string(f) + "'";
  const EncodingTraits* def = encoding_for(scheme);
  throw OptionError("[model_free] format '" + given + "' is not supported for model-free " +
                    std::string(def ? def->name : "full_precision") + " output; use one of " + list);
}

// An FP8 source (DeepSeek style) names its scale block and scale encoding in its quantization_config.
// The first quantization_config dict, depth first (multimodal configs nest it under text_config).
const ojson* find_quantization_config(const ojson& j) {
  if (j.is_object()) {
    auto it = j.find("quantization_config");
    if (it != j.end() && it->is_object()) return &*it;
    for (const auto& [k, v] : j.items())
      if (const ojson* q = find_quantization_config(v)) return q;
  } else if (j.is_array()) {
    for (const auto& v : j)
      if (const ojson* q = find_quantization_config(v)) return q;
  }
  return nullptr;
}

// An int-like config value as upstream reads one (ints, integral floats, digit strings; not bools).
std::optional<int64_t> int_like(const ojson& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::floor(d) == d) return static_cast<int64_t>(d);
  }
  if (v.is_string()) {
    const std::string t = v.get<std::string>();
    try {
      size_t used = 0;
      const int64_t n = std::stoll(t, &used);
      if (used == t.size() && !t.empty() && t[0] != '+') return n;
    } catch (const std::exception&) {
    }
  }
  return std::nullopt;
}

// What the source's config says about already-quantized weights: the FP8 block and scale encoding, the
// model type's own formats (DeepSeek V4/V3.2 E8M0 scales, kimi_k25 INT4).
void read_source_config(const ojson& config, RunContext& ctx) {
  if (config.contains("model_type") && config["model_type"].is_string()) {
    ctx.model_type = config["model_type"].get<std::string>();
    std::transform(ctx.model_type.begin(), ctx.model_type.end(), ctx.model_type.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  }
  const ojson* found = find_quantization_config(config);
  const ojson q = found ? *found : ojson::object();
  if (q.contains("weight_block_size") && q["weight_block_size"].is_array() && q["weight_block_size"].size() == 2) {
    const auto br = int_like(q["weight_block_size"][0]), bc = int_like(q["weight_block_size"][1]);
    // Bounded so that block arithmetic on any weight shape stays far from overflow. An invalid block
    // matters only to FP8 weights, which then fail naming it (dequant's check_fp8_scale).
    const bool valid = br && bc && *br > 0 && *bc > 0 && *br <= (1 << 30) && *bc <= (1 << 30);
    ctx.fp8_block = valid ? std::pair<int64_t, int64_t>(*br, *bc) : std::pair<int64_t, int64_t>(-1, -1);
  }
  auto str = [&](const char* key) { return q.contains(key) && q[key].is_string() ? q[key].get<std::string>() : std::string(); };
  auto lower = [&](const char* key) {
    std::string v = str(key);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    return v;
  };
  ctx.scale_e8m0 = str("scale_fmt") == "ue8m0";
  ctx.deepseek_v32_scales = ctx.model_type == "deepseek_v32" && str("quant_method") == "fp8" &&
                            lower("fmt") == "e4m3" && lower("scale_fmt") == "ue8m0";
  ctx.deepseek_mx_source = ctx.model_type == "deepseek_v4" || ctx.deepseek_v32_scales;
  ctx.int4_source = ctx.model_type == "kimi_k25";
  if (ctx.int4_source) {
    std::vector<const ojson*> cands{&q};
    if (q.contains("weights") && q["weights"].is_object()) cands.push_back(&q["weights"]);
    for (const ojson* c : cands) {
      for (const char* key : {"group_size", "weight_group_size"}) {
        if (ctx.int4_group || !c->contains(key)) continue;
        if (auto g = int_like((*c)[key]); g && *g > 0) ctx.int4_group = *g;
      }
    }
  }
}

// What makes partial output reusable: options that change bytes, the config, and each source shard.
Fingerprint make_fingerprint(const ModelFreeJob& job, const fs::path& src, const std::vector<std::string>& shards) {
  ojson options = job.to_json();
  for (const char* k : {"source_dir", "output_dir", "threads", "shard_parallelism", "remote_shards", "source_revision"})
    options.erase(k);
  Fingerprint fp;
  fp.add_json("options", options);
  fp.add("fastround", std::string(kAutoRoundCompatVersion) + "/resume-1");
  std::ifstream cfg(src / "config.json", std::ios::binary);
  fp.add("config.json", std::string(std::istreambuf_iterator<char>(cfg), {}));
  for (const auto& s : shards) {
    if (fs::is_regular_file(src / s))
      fp.add_file_stat("shard " + s, src / s);
    else
      fp.add("shard " + s, job.source_revision);  // streamed: the hub revision names the bytes
  }
  return fp;
}

struct ShardJob {
  std::string source_name, output_name;
  std::unique_ptr<ShardPlan> plan;  // planned up front for local shards
  std::shared_ptr<SafetensorsReader> reader;
  ShardRecord record;
  bool done = false;
};

ShardRecord record_of(const ShardPlan& plan, uint64_t file_bytes) {
  ShardRecord r;
  r.source_name = plan.source_name;
  r.output_name = plan.output_name;
  r.output_bytes = file_bytes;
  for (const auto& t : plan.outputs) r.tensor_names.push_back(t.name);
  r.quantized = plan.quantized;
  r.ignored = plan.ignored;
  r.accounting = accounting_json(plan);
  return r;
}

void add_accounting(ojson& total, const ojson& shard) {
  for (const char* k : {"quantized", "kept", "dropped"}) {
    if (!total.contains(k)) total[k] = ojson{{"tensors", 0}, {"bytes", 0}};
    total[k]["tensors"] = total[k]["tensors"].get<uint64_t>() + shard[k]["tensors"].get<uint64_t>();
    total[k]["bytes"] = total[k]["bytes"].get<uint64_t>() + shard[k]["bytes"].get<uint64_t>();
  }
  if (!total.contains("dropped_tensors")) total["dropped_tensors"] = ojson::array();
  for (const auto& d : shard["dropped_tensors"]) total["dropped_tensors"].push_back(d);
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  const double v = static_cast<double>(b);
  if (v >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f GB", v / 1e9);
  else if (v >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2f MB", v / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

}  // namespace

// ---- job ----------------------------------------------------------------------------------------

ModelFreeJob ModelFreeJob::from_json(const ojson& j) {
  if (!j.is_object()) throw OptionError("[model_free] job must be a JSON object");
  static const std::set<std::string> known = {"source_dir",  "output_dir",    "scheme",         "overrides",
                                              "layer_config", "ignore_layers", "quant_lm_head", "quant_nontext_module",
                                              "detected_ignore", "format",     "threads", "pad_partial_groups",
                                              "disable_opt_rtn", "shard_parallelism", "remote_shards",
                                              "source_revision", "fill_act_defaults"};
  for (const auto& [k, v] : j.items())
    if (!known.count(k)) throw OptionError("[model_free] unknown job option '" + k + "'");
  ModelFreeJob job;
  try {
    job.source_dir = j.at("source_dir").get<std::string>();
    job.output_dir = j.at("output_dir").get<std::string>();
    if (j.contains("scheme")) job.scheme = j["scheme"];
    if (j.contains("overrides") && !j["overrides"].is_null()) job.overrides = j["overrides"];
    if (j.contains("layer_config") && !j["layer_config"].is_null()) job.layer_config = j["layer_config"];
    job.ignore_layers = j.value("ignore_layers", std::string());
    job.quant_lm_head = j.value("quant_lm_head", false);
    job.quant_nontext_module = j.value("quant_nontext_module", false);
    job.detected_ignore = j.value("detected_ignore", std::vector<std::string>{});
    job.format = j.value("format", std::string("auto_round"));
    job.threads = j.value("threads", 0);
    job.pad_partial_groups = j.value("pad_partial_groups", false);
    if (j.contains("disable_opt_rtn") && !j["disable_opt_rtn"].is_null())
      job.disable_opt_rtn = j["disable_opt_rtn"].get<bool>();
    job.shard_parallelism = j.value("shard_parallelism", 0);
    job.remote_shards = j.value("remote_shards", std::vector<std::string>{});
    job.source_revision = j.value("source_revision", std::string());
    job.fill_act_defaults = j.value("fill_act_defaults", true);
  } catch (const nlohmann::json::exception& e) {
    throw OptionError(std::string("[model_free] invalid job: ") + e.what());
  }
  return job;
}

ojson ModelFreeJob::to_json() const {
  ojson j;
  j["source_dir"] = source_dir.string();
  j["output_dir"] = output_dir.string();
  j["scheme"] = scheme;
  j["overrides"] = overrides;
  j["layer_config"] = layer_config;
  j["ignore_layers"] = ignore_layers;
  j["quant_lm_head"] = quant_lm_head;
  j["quant_nontext_module"] = quant_nontext_module;
  j["detected_ignore"] = detected_ignore;
  j["format"] = format;
  j["threads"] = threads;
  j["pad_partial_groups"] = pad_partial_groups;
  j["disable_opt_rtn"] = disable_opt_rtn ? ojson(*disable_opt_rtn) : ojson();
  j["shard_parallelism"] = shard_parallelism;
  j["remote_shards"] = remote_shards;
  j["source_revision"] = source_revision;
  j["fill_act_defaults"] = fill_act_defaults;
  return j;
}

ResolvedScheme resolve_job_scheme(const ModelFreeJob& job) {
  ResolvedScheme r;
  if (job.scheme.is_string()) {
    r.name = to_upper(job.scheme.get<std::string>());
    r.label = r.name;
    const SchemeFields* preset = find_preset(r.name);
    if (!preset) {
      std::string names;
      for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
      throw OptionError("[model_free] Unknown scheme '" + job.scheme.get<std::string>() + "'. Available: [" + names + "]");
    }
    // W4A16_MIXED keeps dense layers at 8 bits; its expert overrides come from LayerConfig::parse.
    r.fields = r.name == "W4A16_MIXED" ? *find_preset("W8A16") : *preset;
  } else if (job.scheme.is_object()) {
    r.label = "custom " + job.scheme.dump();
    r.fields = SchemeFields::from_json(job.scheme, "scheme");
  } else {
    throw OptionError("[model_free] scheme must be a preset name or a dict of QuantizationScheme fields, got " +
                      job.scheme.dump());
  }
  r.fields = r.fields.merged(SchemeFields::from_json(job.overrides, "scheme overrides"));
  // Upstream resolves a preset with overrides into a QuantizationScheme object, which its preset-name checks
  // (MXFP4/MXFP8 only) no longer see as a name.
  if (!job.overrides.empty() && job.scheme.is_string()) r.label = "custom " + r.name + " + " + job.overrides.dump();
  // Upstream's AutoRound entry hands model-free a fully resolved scheme, validated as such (an MXFP scheme
  // without act_data_type gets 'float' and fails); these fields reach extra_config. W4A16_MIXED follows
  // upstream's core path instead, which receives the bare preset.
  if (job.fill_act_defaults && r.name != "W4A16_MIXED") {
    SchemeFields& f = r.fields;
    if (!f.act_bits) f.act_bits = 16;
    if (!f.act_group_size) f.act_group_size = f.group_size;
    if (!f.act_sym) f.act_sym = f.sym;
    if (!f.act_data_type) f.act_data_type = "float";
    if (!f.act_dynamic) f.act_dynamic = true;
  }
  validate_model_free_scheme(r.fields, r.label);
  return r;
}

std::vector<std::string> diffusion_components(const fs::path& src) {
  if (fs::exists(src / "config.json") || !fs::is_regular_file(src / "transformer" / "config.json")) return {};
  std::vector<std::string> more;
  for (const auto& e : fs::directory_iterator(src)) {
    const std::string name = e.path().filename().string();
    if (name != "transformer" && name.rfind("transformer", 0) == 0 && fs::is_regular_file(e.path() / "config.json"))
      more.push_back(name);
  }
  std::sort(more.begin(), more.end());
  more.insert(more.begin(), "transformer");
  return more;
}

namespace {

// A diffusers pipeline as upstream handles it: each transformer component is quantized as a checkpoint of
// its own into <out>/<component>, every other root entry is copied unless the output already has it. All
// of it is staged and renamed into place at the end, model_index.json last, so a pipeline folder with a
// model_index.json is complete.
ModelFreeResult run_diffusion_pipeline(const ModelFreeJob& job, const std::vector<std::string>& components,
                                       const ModelFreeCallbacks& callbacks) {
  Logger log{&callbacks};
  const fs::path src = job.source_dir;
  const fs::path out = job.output_dir;
  check_output_location(src, out);
  if (!job.remote_shards.empty())
    throw OptionError("[model_free] '" + src.string() + "' is a diffusers pipeline; streaming its shards is not "
                      "supported, download it whole (stream=False)");
  log(LogLevel::Info, "[model_free] Detected diffusion model (no root config.json, found transformer/ subfolder). "
                      "All transformer components will be quantized; other sub-components are copied.");
  const bool created_out = !fs::exists(out);
  const fs::path staging = out / kStagingDir;
  ModelFreeResult total;
  total.output_dir = out;
  total.summary = ojson::object();
  try {
    fs::create_directories(staging);
    for (const auto& name : components) {
      log(LogLevel::Info, "[model_free] Model-free quantization of " + name);
      ModelFreeJob part = job;
      part.source_dir = src / name;
      part.output_dir = staging / name;
      ModelFreeResult r = run_model_free(part, callbacks);
      total.quantized_layers.insert(total.quantized_layers.end(), r.quantized_layers.begin(), r.quantized_layers.end());
      total.ignored_layers.insert(total.ignored_layers.end(), r.ignored_layers.begin(), r.ignored_layers.end());
      for (const auto& f : r.shard_files) total.shard_files.push_back(name + "/" + f);
      total.source_bytes += r.source_bytes;
      total.output_bytes += r.output_bytes;
      if (name == "transformer") total.quantization_config = r.quantization_config;
      total.summary[name] = r.summary;
    }
    std::vector<fs::path> copies;
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string name = e.path().filename().string();
      if (is_stale_metadata(name) || name == "model_index.json" || fs::exists(out / name)) continue;
      if (std::find(components.begin(), components.end(), name) != components.end()) continue;
      copy_tree(e.path(), staging / name);
      copies.push_back(name);
    }
    if (fs::is_regular_file(src / "model_index.json")) copy_tree(src / "model_index.json", staging / "model_index.json");
    for (const auto& name : components) {
      std::error_code ec;
      fs::remove_all(out / name, ec);  // an earlier output of this component
      fs::rename(staging / name, out / name);
    }
    for (const auto& name : copies) fs::rename(staging / name, out / name);
    if (fs::exists(staging / "model_index.json")) fs::rename(staging / "model_index.json", out / "model_index.json");
    fs::remove(staging);
  } catch (...) {
    // Components keep their own resume state under the staging folder; without any, nothing is left.
    std::error_code ec;
    bool resumable = false;
    for (const auto& name : components)
      resumable = resumable || fs::exists(staging / name / kStagingDir / kResumeManifestName, ec);
    if (!resumable) {
      fs::remove_all(staging, ec);
      if (created_out && fs::is_empty(out, ec)) fs::remove(out, ec);
    }
    throw;
  }
  return total;
}

}  // namespace

ModelFreeResult run_model_free(const ModelFreeJob& job, const ModelFreeCallbacks& callbacks) {
  Logger log{&callbacks};
  const auto started = std::chrono::steady_clock::now();
  const fs::path src = job.source_dir;
  const fs::path out = job.output_dir;
  if (!fs::exists(src)) throw MissingPathError("[model_free] model path '" + src.string() + "' does not exist");
  if (!fs::is_directory(src)) throw OptionError("[model_free] model path '" + src.string() + "' is not a folder");
  if (!fs::is_regular_file(src / "config.json")) {
    const std::vector<std::string> components = diffusion_components(src);
    if (!components.empty()) return run_diffusion_pipeline(job, components, callbacks);
    throw MissingPathError("[model_free] '" + src.string() + "' has no config.json (nor a diffusers transformer/ "
                           "folder with one)");
  }
  check_output_location(src, out);
  const ResolvedScheme scheme = resolve_job_scheme(job);
  const std::string fmt = job.format.substr(0, job.format.find(','));
  if (job.threads > 0) set_num_threads(job.threads);

  const ojson config = read_json_file(src / "config.json");
  if (!config.is_object())
    throw CheckpointError("[model_free] '" + (src / "config.json").string() + "' holds " +
                          std::string(config.type_name()) + ", not a JSON object");
  RunContext ctx{job, scheme.fields, nullptr, LayerConfig::parse(job.layer_config, scheme.name)};
  ctx.log = log;
  check_model_free_format(fmt, scheme.fields, ctx.layer_config, job.format);
  ctx.default_encoding = encoding_for(scheme.fields, fmt);
  if (!ctx.default_encoding) ctx.default_encoding = &encoding(Encoding::IntGptq);
  ctx.format = fmt;
  ctx.fake_format = fmt == "fake";
  ctx.llm_compressor = fmt == "llm_compressor";
  ctx.opt_rtn = !job.disable_opt_rtn.value_or(false);
  read_source_config(config, ctx);
  IgnoreOptions io;
  io.ignore_layers = job.ignore_layers;
  io.quant_lm_head = job.quant_lm_head;
  io.quant_nontext_module = job.quant_nontext_module;
  io.detected = job.detected_ignore;
  io.predefined = predefined_ignore_layers(config);
  ctx.ignore = std::make_unique<IgnoreMatcher>(build_ignore_patterns(io, ctx.layer_config));

  std::vector<std::string> order = discover_shards(src, job.remote_shards, &ctx.tensor_home);
  const auto donors = order_for_donors(order, ctx.tensor_home, log);
  const size_t n = order.size();
  std::vector<ShardJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    jobs[i].source_name = order[i];
    jobs[i].output_name = n == 1 ? "model.safetensors" : name;
  }

  const bool created_out = !fs::exists(out);
  const fs::path staging = out / kStagingDir;
  ShardStore store(src, staging / kDownloadDir, callbacks);
  // Local shards are read and planned before anything is written: bad input fails with nothing on disk.
  uint64_t total = 0, largest = 0;
  std::map<std::string, std::string> seen;
  auto donor_lookup = [&](const std::string& tensor) -> std::pair<const SafetensorsReader*, const TensorInfo*> {
    const std::string& home = ctx.tensor_home.at(tensor);
    auto r = store.open(home, {});
    return {r.get(), r->find(tensor)};
  };
  auto plan_job = [&](ShardJob& j) {
    j.plan = std::make_unique<ShardPlan>();
    j.plan->source_name = j.source_name;
    j.plan->output_name = j.output_name;
    plan_shard(ctx, *j.reader, donor_lookup, *j.plan);
  };
  const bool local = job.remote_shards.empty();
  if (local) {
    for (auto& j : jobs) {
      j.reader = store.open(j.source_name, {});
      total += j.reader->data_bytes();
      for (const auto& t : j.reader->tensors()) {
        largest = std::max(largest, t.nbytes());
        auto [it, fresh] = seen.emplace(t.name, j.source_name);
        if (!fresh)
          throw CheckpointError("[model_free] tensor '" + t.name + "' appears in both '" + it->second + "' and '" +
                                j.source_name + "'; a checkpoint must hold each tensor once");
      }
    }
  }

  std::set<std::string> written_names;
  auto claim_names = [&](const std::vector<std::string>& names, const std::string& shard) {
    for (const auto& t : names)
      if (!written_names.insert(t).second)
        throw CheckpointError("[model_free] tensor '" + t + "' would be written twice (again by shard '" + shard +
                              "'); refusing to write a checkpoint with duplicate names");
  };
  if (local) {
    for (auto& j : jobs) {
      plan_job(j);
      std::vector<std::string> names;
      for (const auto& t : j.plan->outputs) names.push_back(t.name);
      claim_names(names, j.source_name);
    }
  }

  fs::create_directories(out);
  std::string resume_message;
  ResumeManifest manifest(staging, make_fingerprint(job, src, order), resume_message);
  if (!resume_message.empty())
    log(resume_message.rfind("discarding", 0) == 0 ? LogLevel::Warning : LogLevel::Info, "[model_free] " + resume_message);
  for (auto& j : jobs) {
    if (const ShardRecord* r = manifest.record(j.output_name); r && r->source_name == j.source_name) {
      j.done = true;
      j.record = *r;
    }
  }
  for (auto& j : jobs)
    if (j.done) j.plan.reset();  // finished by an earlier run
  log(LogLevel::Info, "[model_free] " + std::to_string(n) + " shard(s)" + (local ? ", " + human_bytes(total) : "") +
                          ", scheme " + scheme.label + " -> " + out.string());

  for (const auto& j : jobs)
    if (!j.done) {
      store.pin(j.source_name);
      auto d = donors.find(j.source_name);
      if (d != donors.end())
        for (const auto& s : d->second) store.pin(s);
    }
  for (auto& j : jobs) j.reader.reset();  // the store keeps what is still needed

  const int parallel = choose_parallelism(job, n, largest, log);
  const int threads_each = std::max(1, (job.threads > 0 ? job.threads : max_threads()) / parallel);
  std::atomic<bool> cancel{false};
  std::atomic<uint64_t> bytes_done{0};
  std::mutex mu;
  std::condition_variable cv;
  size_t next = 0, finished = 0;
  std::exception_ptr failure;
  std::vector<size_t> todo;
  for (size_t i = 0; i < n; ++i)
    if (!jobs[i].done) todo.push_back(i);
    else if (local) bytes_done += fs::file_size(src / jobs[i].source_name);

  ModelFreeProgress p;
  p.shard_count = static_cast<int>(n);
  p.bytes_total = total;
  // One shard at a time runs on the calling thread and reports between tensors, so cancelling from the
  // progress callback is prompt and deterministic; with several in flight the calling thread reports
  // whenever a worker finishes a tensor (or every 100 ms).
  const bool inline_run = parallel == 1 || todo.size() <= 1;
  auto report = [&](size_t k) {
    p.shard_index = static_cast<int>(k + 1);
    p.shard_name = jobs[k].source_name;
    p.bytes_done = bytes_done;
    if (callbacks.progress && !callbacks.progress(p)) throw Cancelled("[model_free] cancelled");
  };
  auto worker = [&]() {
    if (!inline_run) set_num_threads(threads_each);
    while (true) {
      size_t k;
      std::vector<std::string> upcoming;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (next >= todo.size() || cancel) return;
        k = todo[next++];
        for (size_t u = next; u < todo.size() && upcoming.size() < static_cast<size_t>(parallel); ++u)
          upcoming.push_back(jobs[todo[u]].source_name);
      }
      ShardJob& j = jobs[k];
      try {
        if (inline_run) report(k);
        j.reader = store.open(j.source_name, upcoming);
        if (!j.plan) {
          plan_job(j);
          std::vector<std::string> names;
          for (const auto& t : j.plan->outputs) names.push_back(t.name);
          std::lock_guard<std::mutex> lock(mu);
          claim_names(names, j.source_name);
        }
        std::function<void()> after_tensor;
        if (inline_run)
          after_tensor = [&, k] { report(k); };
        else
          after_tensor = [&] { cv.notify_all(); };
        run_shard(ctx, *j.plan, staging, cancel, bytes_done, after_tensor);
        j.record = record_of(*j.plan, fs::file_size(staging / j.output_name));
        manifest.mark_done(j.record);
        log(LogLevel::Info, "[model_free] shard " + std::to_string(k + 1) + "/" + std::to_string(n) + " (" +
                                j.source_name + " -> " + j.output_name + "): " + std::to_string(j.plan->quantized.size()) +
                                " quantized, " + std::to_string(j.plan->ignored.size()) + " kept");
        j.plan.reset();
        j.reader.reset();
        store.unpin(j.source_name);
        auto d = donors.find(j.source_name);
        if (d != donors.end())
          for (const auto& s : d->second) store.unpin(s);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!failure) failure = std::current_exception();
        cancel = true;
        cv.notify_all();
        return;
      }
      std::lock_guard<std::mutex> lock(mu);
      ++finished;
      cv.notify_all();
    }
  };

  ModelFreeResult result;
  result.output_dir = out;
  std::vector<std::thread> pool;
  // A std::thread still joinable when unwinding calls std::terminate: stop and join the workers first.
  struct JoinOnUnwind {
    std::vector<std::thread>& pool;
    std::atomic<bool>& cancel;
    ~JoinOnUnwind() {
      for (auto& t : pool)
        if (t.joinable()) {
          cancel = true;
          t.join();
        }
    }
  } join_on_unwind{pool, cancel};
  try {
    if (inline_run) {
      worker();
    } else {
      for (int w = 0; w < std::min<int>(parallel, static_cast<int>(todo.size())); ++w) pool.emplace_back(worker);
      std::unique_lock<std::mutex> lock(mu);
      while (finished < todo.size() && !failure) {
        cv.wait_for(lock, std::chrono::milliseconds(100));
        if (failure) break;
        const size_t k = todo[std::min(next, todo.size()) - (next > 0 ? 1 : 0)];
        lock.unlock();
        bool go = true;
        try {
          report(k);
        } catch (...) {
          go = false;
          lock.lock();
          if (!failure) failure = std::current_exception();
          cancel = true;
          break;
        }
        lock.lock();
        if (!go) break;
      }
    }
    for (auto& t : pool) t.join();
    if (failure) std::rethrow_exception(failure);
    if (cancel) throw Cancelled("[model_free] cancelled");
    p.shard_index = static_cast<int>(n);
    p.bytes_done = std::max<uint64_t>(bytes_done, total);
    if (callbacks.progress && !callbacks.progress(p)) throw Cancelled("[model_free] cancelled");

    ojson weight_map = ojson::object();
    ojson accounting = ojson::object();
    for (const auto& j : jobs) {
      for (const auto& t : j.record.tensor_names) weight_map[t] = j.output_name;
      result.quantized_layers.insert(result.quantized_layers.end(), j.record.quantized.begin(), j.record.quantized.end());
      result.ignored_layers.insert(result.ignored_layers.end(), j.record.ignored.begin(), j.record.ignored.end());
      result.shard_files.push_back(j.output_name);
      result.output_bytes += j.record.output_bytes;
      add_accounting(accounting, j.record.accounting);
    }
    result.source_bytes = accounting["quantized"]["bytes"].get<uint64_t>() + accounting["kept"]["bytes"].get<uint64_t>() +
                          accounting["dropped"]["bytes"].get<uint64_t>();
    // Upstream's rule: an output whose tensors all sit in one shard is model.safetensors, without an index
    // (a shard left empty, having donated all it held, is still written).
    size_t filled = 0, only = 0;
    for (size_t i = 0; i < n; ++i)
      if (!jobs[i].record.tensor_names.empty()) {
        ++filled;
        only = i;
      }
    const bool single = n > 1 && filled == 1;
    if (single) {
      fs::rename(staging / jobs[only].output_name, staging / "model.safetensors");
      result.shard_files[only] = "model.safetensors";
    }
    if (n > 1 && !single) {
      ojson index;
      index["metadata"] = ojson{{"total_size", 0}};
      index["weight_map"] = weight_map;
      write_text_atomic(staging / "model.safetensors.index.json", python_json_dumps(index));
    }
    result.quantization_config = build_quantization_config(ctx, result.quantized_layers, result.ignored_layers);
    ojson out_config = config;
    drop_quantization_configs(out_config);
    out_config["quantization_config"] = result.quantization_config;
    write_text_atomic(staging / "quantization_config.json", python_json_dumps(result.quantization_config));
    write_text_atomic(staging / "config.json", python_json_dumps(out_config));
    const uint64_t qb = accounting["quantized"]["bytes"].get<uint64_t>();
    accounting["quantized_bytes_fraction"] = result.source_bytes ? static_cast<double>(qb) / result.source_bytes : 0.0;
    accounting["source_bytes"] = result.source_bytes;
    accounting["output_bytes"] = result.output_bytes;
    ojson summary;
    summary["fastround_model_free"] = accounting;
    summary["quantized_layers"] = result.quantized_layers.size();
    summary["kept_layers"] = result.ignored_layers.size();
    summary["shards"] = n;
    result.summary = summary;
    write_text_atomic(staging / kSummaryFile, python_json_dumps(summary));
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string name = e.path().filename().string();
      if ((e.is_regular_file() && is_weight_file(name)) || is_stale_metadata(name)) continue;
      if (fs::exists(out / name) || fs::exists(staging / name)) continue;
      copy_tree(e.path(), staging / name);
    }
    std::error_code ec;
    fs::remove_all(staging / kDownloadDir, ec);
    manifest.retire();
    publish(staging, out, result.shard_files, log);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    char line[512];
    std::snprintf(line, sizeof line,
                  "[model_free] summary: %llu tensors quantized (%s), %llu kept (%s), %llu dropped (%s); "
                  "%.1f%% of source bytes quantized; output %s in %.2f s",
                  static_cast<unsigned long long>(accounting["quantized"]["tensors"].get<uint64_t>()),
                  human_bytes(qb).c_str(),
                  static_cast<unsigned long long>(accounting["kept"]["tensors"].get<uint64_t>()),
                  human_bytes(accounting["kept"]["bytes"].get<uint64_t>()).c_str(),
                  static_cast<unsigned long long>(accounting["dropped"]["tensors"].get<uint64_t>()),
                  human_bytes(accounting["dropped"]["bytes"].get<uint64_t>()).c_str(),
                  100.0 * accounting["quantized_bytes_fraction"].get<double>(), human_bytes(result.output_bytes).c_str(),
                  secs);
    log(LogLevel::Info, line);
  } catch (...) {
    std::error_code ec;
    if (manifest.done_count() == 0) {
      fs::remove_all(staging, ec);
      if (created_out && fs::is_empty(out, ec)) fs::remove(out, ec);
    } else {
      log(LogLevel::Warning, "[model_free] " + std::to_string(manifest.done_count()) +
                                 " finished shard(s) kept in '" + staging.string() +
                                 "'; rerun the same command to resume");
    }
    throw;
  }
  return result;
}

}  // namespace fastround
