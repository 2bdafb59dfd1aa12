#include "fastround/pipeline/model_free.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>
#include <memory>
#include <set>

#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/io/files.h"
#include "fastround/io/safetensors.h"
#include "fastround/match/patterns.h"
#include "fastround/quant/int_rtn.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStagingDir = ".fastround-partial";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string layer_of(const std::string& tensor_name) {
  const size_t dot = tensor_name.rfind('.');
  return dot == std::string::npos ? tensor_name : tensor_name.substr(0, dot);
}

// Prefix before the first purely numeric dotted component at index > 0 ("model.layers.3.mlp" -> "model.layers").
std::optional<std::string> block_name_of(const std::string& layer) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t dot = layer.find('.', start);
    parts.push_back(layer.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (!p.empty() && std::all_of(p.begin(), p.end(), [](unsigned char c) { return std::isdigit(c); })) {
      std::string prefix = parts[0];
      for (size_t k = 1; k < i; ++k) prefix += "." + parts[k];
      return prefix;
    }
  }
  return std::nullopt;
}

struct Logger {
  const ModelFreeCallbacks& cb;
  void operator()(LogLevel level, const std::string& msg) const {
    if (cb.log) cb.log(level, msg);
  }
};

// ---- source discovery -------------------------------------------------------------------------

std::vector<std::string> discover_shards(const fs::path& src) {
  std::vector<fs::path> index_files, weight_files, bin_files;
  for (const auto& e : fs::directory_iterator(src)) {
    if (!e.is_regular_file()) continue;
    const std::string n = e.path().filename().string();
    if (ends_with(n, ".safetensors.index.json")) index_files.push_back(e.path());
    if (ends_with(n, ".safetensors")) weight_files.push_back(e.path());
    if (ends_with(n, ".bin")) bin_files.push_back(e.path());
  }
  std::sort(index_files.begin(), index_files.end());
  std::sort(weight_files.begin(), weight_files.end());
  std::vector<std::string> shards;
  if (!index_files.empty()) {
    fs::path index = src / "model.safetensors.index.json";
    if (!fs::exists(index)) index = index_files.front();
    const ojson j = read_json_file(index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw CheckpointError("[model_free] index '" + index.string() + "' has no weight_map object");
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string())
        throw CheckpointError("[model_free] index '" + index.string() + "': tensor '" + tensor +
                              "' maps to a non-string " + file.dump());
      const std::string f = file.get<std::string>();
      if (f.empty() || fs::path(f).is_absolute() || f.find("..") != std::string::npos || f.find('/') != std::string::npos)
        throw CheckpointError("[model_free] index '" + index.string() + "': tensor '" + tensor + "' maps to '" + f +
                              "', which is not a file name inside '" + src.string() + "'");
      if (std::find(shards.begin(), shards.end(), f) == shards.end()) shards.push_back(f);
    }
    for (const auto& f : shards)
      if (!fs::is_regular_file(src / f))
        throw MissingPathError("[model_free] shard '" + f + "' listed in '" + index.filename().string() +
                               "' is missing from '" + src.string() + "'");
    return shards;
  }
  for (const auto& w : weight_files) shards.push_back(w.filename().string());
  if (shards.empty()) {
    if (!bin_files.empty())
      throw OptionError("[model_free] '" + src.string() +
                        "' holds only PyTorch .bin weights; fastround model-free reads *.safetensors shards "
                        "(convert them with transformers' save_pretrained(safe_serialization=True))");
    throw MissingPathError("[model_free] no *.safetensors weight files in '" + src.string() + "'");
  }
  return shards;
}

// ---- planning ---------------------------------------------------------------------------------

enum class Action { Copy, IntGptq };

struct TensorPlan {
  const TensorInfo* src = nullptr;
  Action action = Action::Copy;
  std::string layer;
  IntGptqLayout layout{};
  IntQuantParams params{};
};

struct ShardPlan {
  std::string source_name, output_name;
  std::unique_ptr<SafetensorsReader> reader;
  std::vector<TensorPlan> tensors;
  std::vector<OutputTensor> outputs;
  std::vector<std::string> quantized, ignored;
};

struct RunContext {
  const ModelFreeJob& job;
  SchemeFields default_scheme;
  const SchemeTraits* default_traits;
  LayerConfig layer_config;
  std::unique_ptr<IgnoreMatcher> ignore;
  Logger log;
};

void plan_shard(const RunContext& ctx, ShardPlan& shard) {
  for (const TensorInfo& t : shard.reader->tensors()) {
    TensorPlan tp;
    tp.src = &t;
    const bool is_weight = ends_with(t.name, ".weight");
    const bool is_layer_weight = is_weight && t.shape.size() > 1;
    const std::string layer = layer_of(t.name);
    bool quantize = is_weight && t.shape.size() == 2;
    if (quantize && ctx.ignore->matches(layer) && !ctx.layer_config.has_key(layer)) quantize = false;
    if (quantize && is_always_skipped(t.name)) quantize = false;
    std::optional<SchemeFields> eff;
    const LayerOverride* entry = nullptr;
    if (quantize) {
      entry = ctx.layer_config.match(layer);
      eff = resolve_layer_scheme(ctx.default_scheme, entry);
      if (!eff || eff->bits.value_or(16) >= 16) quantize = false;
    }
    if (quantize) {
      const std::string site = "[model_free] " + shard.reader->path().string() + ": tensor '" + t.name + "'";
      const std::string from = entry ? " (from layer_config['" + entry->key + "'])" : "";
      const std::string dt = eff->data_type.value_or("int");
      if (dt.find("mx_fp") != std::string::npos || dt == "nvfp4_v2")
        throw OptionError(site + ": data_type '" + dt + "'" + from + " is not supported by this fastround version");
      const int bits = *eff->bits;
      if (!traits_for(*eff).supports_bits(bits))
        throw OptionError(site + ": bits=" + std::to_string(bits) + from +
                          " is not supported by model-free INT quantization (2, 4 or 8)");
      if (!dtype_is_float_weight(t.dtype))
        throw OptionError(site + " has dtype " + std::string(dtype_name(t.dtype)) +
                          "; model-free quantizes F32, F16 and BF16 weights (ignore the layer to keep it as is)");
      // Each layer packs by its own sym, as upstream does (the config's packing_format follows the default).
      const SchemeTraits& traits = traits_for(*eff);
      const bool sym = eff->sym.value_or(true);
      tp.params = IntQuantParams{bits, eff->group_size.value_or(128), sym,
                                 sym ? traits.zero_offset_sym : traits.zero_offset_asym};
      const int64_t g = tp.params.group_size;
      if (g == 0 || g < -1)
        throw OptionError(site + ": group_size must be -1 or positive, got " + std::to_string(g) + from);
      const int64_t in = t.shape[1];
      const bool partial = g == -1 ? in % (32 / bits) != 0 : in % g != 0;
      if (partial && !ctx.job.pad_partial_groups) {
        // A padded qweight loads in neither upstream's loader nor vLLM; keep the weight (see docs/compatibility.md).
        ctx.log(LogLevel::Warning, "[model_free] " + t.name + ": in_features " + std::to_string(in) +
                                       " is not a multiple of group_size " + std::to_string(g) +
                                       "; keeping it in full precision (pad_partial_groups=True pads like upstream)");
        quantize = false;
      } else {
        try {
          tp.layout = int_gptq_layout(t.shape[0], in, tp.params, t.name.c_str());
        } catch (const OptionError& e) {
          // Upstream's kernel rejects this shape and keeps the weight; so do we, loudly.
          ctx.log(LogLevel::Warning, std::string(e.what()) + "; keeping the original weight");
          quantize = false;
        }
      }
    }
    if (quantize) {
      tp.action = Action::IntGptq;
      tp.layer = layer;
      const auto& L = tp.layout;
      shard.outputs.push_back({layer + ".qweight", DType::I32, {L.cols_p / L.pack_factor, L.rows}});
      shard.outputs.push_back({layer + ".qzeros", DType::I32, {L.groups, L.rows_p / L.pack_factor}});
      shard.outputs.push_back({layer + ".scales", DType::F16, {L.groups, L.rows}});
      shard.quantized.push_back(layer);
    } else {
      shard.outputs.push_back({t.name, t.dtype, t.shape});
      if (is_layer_weight) shard.ignored.push_back(layer);
    }
    shard.tensors.push_back(std::move(tp));
  }
}

// ---- execution --------------------------------------------------------------------------------

struct ProgressState {
  const ModelFreeCallbacks& cb;
  ModelFreeProgress p;
  void report() {
    if (cb.progress && !cb.progress(p)) throw Cancelled("[model_free] cancelled");
  }
};

void run_shard(ShardPlan& shard, const fs::path& staging, ProgressState& progress) {
  SafetensorsWriter writer(staging / shard.output_name, shard.outputs);
  const SafetensorsReader& reader = *shard.reader;
  for (size_t i = 0; i < shard.tensors.size(); ++i) {
    const TensorPlan& tp = shard.tensors[i];
    const TensorInfo& t = *tp.src;
    if (i + 1 < shard.tensors.size()) reader.will_need(*shard.tensors[i + 1].src);
    if (tp.action == Action::Copy) {
      writer.write(writer.index_of(t.name), reader.data(t), t.nbytes());
    } else {
      const IntGptqLayout& L = tp.layout;
      std::vector<int32_t> qweight(static_cast<size_t>(L.qweight_elems()));
      std::vector<int32_t> qzeros(static_cast<size_t>(L.qzeros_elems()));
      std::vector<uint16_t> scales(static_cast<size_t>(L.scales_elems()));
      quantize_int_gptq(t.dtype, reader.data(t), L, tp.params, qweight.data(), qzeros.data(), scales.data());
      writer.write(writer.index_of(tp.layer + ".qweight"), qweight.data(), qweight.size() * 4);
      writer.write(writer.index_of(tp.layer + ".qzeros"), qzeros.data(), qzeros.size() * 4);
      writer.write(writer.index_of(tp.layer + ".scales"), scales.data(), scales.size() * 2);
    }
    reader.release(t);
    progress.p.bytes_done += t.nbytes();
    progress.report();
  }
  writer.commit();
}

// ---- configs ----------------------------------------------------------------------------------

bool differs(const std::optional<int>& a, const std::optional<int>& b) { return a && a != b; }

// With a full-precision default, the config reads "INT with full-precision exceptions": its top-level
// fields are the most common (bits, group_size, sym, data_type) among quantized layers, first seen on ties.
SchemeFields config_default_scheme(const RunContext& ctx, const std::vector<std::string>& quantized) {
  if (ctx.default_scheme.bits.value_or(16) < 16) return ctx.default_scheme;
  std::vector<std::pair<SchemeFields, int>> counts;
  for (const auto& layer : quantized) {
    const auto eff = resolve_layer_scheme(ctx.default_scheme, ctx.layer_config.match(layer));
    if (!eff || eff->bits.value_or(16) >= 16) continue;
    SchemeFields key;
    key.bits = eff->bits;
    key.group_size = eff->group_size ? eff->group_size : ctx.default_scheme.group_size;
    key.sym = eff->sym.value_or(true);
    std::string dt = eff->data_type.value_or("int");
    std::transform(dt.begin(), dt.end(), dt.begin(), [](unsigned char c) { return std::tolower(c); });
    key.data_type = dt;
    auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == key; });
    if (it == counts.end())
      counts.emplace_back(key, 1);
    else
      ++it->second;
  }
  if (counts.empty()) return ctx.default_scheme;
  auto best = counts.begin();
  for (auto it = counts.begin(); it != counts.end(); ++it)
    if (it->second > best->second) best = it;
  return best->first;
}

ojson build_extra_config(const RunContext& ctx, const SchemeFields& d, const std::vector<std::string>& quantized,
                         const std::vector<std::string>& ignored) {
  ojson extra = ojson::object();
  for (const auto& e : ctx.layer_config.entries()) {
    const SchemeFields& c = e.fields;
    const int bits = c.bits.value_or(d.bits.value_or(16));
    const bool changes = differs(c.bits, d.bits) || (c.group_size && c.group_size != d.group_size) ||
                         (c.sym && c.sym != d.sym);
    if (bits >= 16 || changes) extra[e.key] = c.to_json();
  }
  for (const auto& layer : ignored) {
    if (extra.contains(layer) || layer.find("embed") != std::string::npos || layer.find("conv") != std::string::npos)
      continue;
    extra[layer] = ojson{{"bits", 16}, {"data_type", "float"}};
  }
  for (const auto& layer : quantized) {
    if ((layer == "lm_head" || layer == "head" || layer == "embed_out" || layer == "output") && !extra.contains(layer)) {
      const LayerOverride* exact = nullptr;
      for (const auto& e : ctx.layer_config.entries())
        if (e.key == layer) exact = &e;
      extra[layer] = exact ? exact->fields.to_json() : d.to_json();
    }
  }
  return extra;
}

ojson build_quantization_config(const RunContext& ctx, const std::vector<std::string>& quantized,
                                const std::vector<std::string>& ignored) {
  const SchemeFields d = config_default_scheme(ctx, quantized);
  ojson q;
  q["quant_method"] = "auto-round";
  q["packing_format"] = std::string(d.sym.value_or(true) ? ctx.default_traits->packing_format_sym
                                                         : ctx.default_traits->packing_format_asym);
  q["bits"] = d.bits.value_or(16);
  q["group_size"] = d.group_size.value_or(128);
  q["sym"] = d.sym.value_or(true);
  q["data_type"] = d.data_type.value_or("int");
  q["iters"] = 0;
  q["model_free"] = true;
  q["autoround_version"] = kAutoRoundCompatVersion;
  std::vector<std::string> blocks;
  for (const auto& layer : quantized) {
    const auto b = block_name_of(layer);
    if (b && std::find(blocks.begin(), blocks.end(), *b) == blocks.end()) blocks.push_back(*b);
  }
  if (!blocks.empty()) {
    std::string joined;
    for (const auto& b : blocks) joined += (joined.empty() ? "" : ",") + b;
    q["block_name_to_quantize"] = joined;
  }
  ojson extra = build_extra_config(ctx, d, quantized, ignored);
  if (!extra.empty()) q["extra_config"] = extra;
  return q;
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

}  // namespace

// ---- job ----------------------------------------------------------------------------------------

ModelFreeJob ModelFreeJob::from_json(const ojson& j) {
  if (!j.is_object()) throw OptionError("[model_free] job must be a JSON object");
  static const std::set<std::string> known = {"source_dir",  "output_dir",    "scheme",         "overrides",
                                              "layer_config", "ignore_layers", "quant_lm_head", "quant_nontext_module",
                                              "detected_ignore", "format",     "threads", "pad_partial_groups"};
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
  validate_model_free_scheme(r.fields, r.label);
  // Upstream's AutoRound entry hands model-free a fully resolved scheme; these fields reach extra_config.
  // W4A16_MIXED follows upstream's core path instead, which receives the bare preset.
  if (r.name != "W4A16_MIXED" && r.fields.bits.value_or(16) < 16) {
    SchemeFields& f = r.fields;
    if (!f.act_bits) f.act_bits = 16;
    if (!f.act_group_size) f.act_group_size = f.group_size;
    if (!f.act_sym) f.act_sym = f.sym;
    if (!f.act_data_type) f.act_data_type = "float";
    if (!f.act_dynamic) f.act_dynamic = true;
  }
  return r;
}

ModelFreeResult run_model_free(const ModelFreeJob& job, const ModelFreeCallbacks& callbacks) {
  Logger log{callbacks};
  const fs::path src = job.source_dir;
  const fs::path out = job.output_dir;
  if (!fs::exists(src)) throw MissingPathError("[model_free] model path '" + src.string() + "' does not exist");
  if (!fs::is_directory(src)) throw OptionError("[model_free] model path '" + src.string() + "' is not a folder");
  if (!fs::is_regular_file(src / "config.json"))
    throw MissingPathError("[model_free] '" + src.string() + "' has no config.json");
  check_output_location(src, out);
  const std::string fmt = job.format.substr(0, job.format.find(','));
  if (fmt != "auto_round" && fmt != "auto_round:auto_gptq")
    throw OptionError("[model_free] format '" + job.format +
                      "' is not supported for INT model-free output; use 'auto_round' or 'auto_round:auto_gptq'");
  if (job.threads > 0) set_num_threads(job.threads);

  const ResolvedScheme scheme = resolve_job_scheme(job);
  const ojson config = read_json_file(src / "config.json");
  RunContext ctx{job, scheme.fields, &traits_for(scheme.fields), LayerConfig::parse(job.layer_config, scheme.name),
                 nullptr, log};
  if (ctx.default_traits->family == KernelFamily::None) ctx.default_traits = &traits_for(*find_preset("W4A16"));
  IgnoreOptions io;
  io.ignore_layers = job.ignore_layers;
  io.quant_lm_head = job.quant_lm_head;
  io.quant_nontext_module = job.quant_nontext_module;
  io.detected = job.detected_ignore;
  io.predefined = predefined_ignore_layers(config);
  ctx.ignore = std::make_unique<IgnoreMatcher>(build_ignore_patterns(io, ctx.layer_config));

  // Read and plan every shard before writing anything: bad input fails with nothing on disk.
  const std::vector<std::string> shard_names = discover_shards(src);
  std::vector<ShardPlan> shards(shard_names.size());
  uint64_t total = 0;
  std::map<std::string, std::string> tensor_home;
  for (size_t i = 0; i < shard_names.size(); ++i) {
    ShardPlan& s = shards[i];
    s.source_name = shard_names[i];
    s.reader = std::make_unique<SafetensorsReader>(src / shard_names[i]);
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shard_names.size());
    s.output_name = shard_names.size() == 1 ? "model.safetensors" : name;
    plan_shard(ctx, s);
    total += s.reader->data_bytes();
    for (const auto& t : s.reader->tensors()) {
      auto [it, fresh] = tensor_home.emplace(t.name, s.source_name);
      if (!fresh)
        throw CheckpointError("[model_free] tensor '" + t.name + "' appears in both '" + it->second + "' and '" +
                              s.source_name + "'; a checkpoint must hold each tensor once");
    }
  }
  log(LogLevel::Info, "[model_free] " + std::to_string(shards.size()) + " shard(s), " + std::to_string(total) +
                          " bytes, scheme " + scheme.label + " -> " + out.string());

  const bool created_out = !fs::exists(out);
  fs::create_directories(out);
  const fs::path staging = out / kStagingDir;
  fs::remove_all(staging);
  fs::create_directories(staging);
  ModelFreeResult result;
  result.output_dir = out;
  try {
    ProgressState progress{callbacks, {}};
    progress.p.shard_count = static_cast<int>(shards.size());
    progress.p.bytes_total = total;
    ojson weight_map = ojson::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      ShardPlan& s = shards[i];
      progress.p.shard_index = static_cast<int>(i + 1);
      progress.p.shard_name = s.source_name;
      progress.report();
      run_shard(s, staging, progress);
      // weight_map lists source keys in order, a quantized weight expanded to qweight, qzeros, scales.
      for (const auto& t : s.outputs) {
        weight_map[t.name] = s.output_name;
        result.output_bytes += t.nbytes();
      }
      result.quantized_layers.insert(result.quantized_layers.end(), s.quantized.begin(), s.quantized.end());
      result.ignored_layers.insert(result.ignored_layers.end(), s.ignored.begin(), s.ignored.end());
      result.shard_files.push_back(s.output_name);
      log(LogLevel::Info, "[model_free] shard " + std::to_string(i + 1) + "/" + std::to_string(shards.size()) + " (" +
                              s.source_name + " -> " + s.output_name + "): " + std::to_string(s.quantized.size()) +
                              " quantized, " + std::to_string(s.ignored.size()) + " kept");
      s.reader.reset();
    }
    result.source_bytes = total;
    if (shards.size() > 1) {
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
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string n = e.path().filename().string();
      if ((e.is_regular_file() && is_weight_file(n)) || is_stale_metadata(n)) continue;
      if (fs::exists(out / n) || fs::exists(staging / n)) continue;
      copy_tree(e.path(), staging / n);
    }
    publish(staging, out, result.shard_files, log);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    if (created_out && fs::is_empty(out, ec)) fs::remove(out, ec);
    throw;
  }
  return result;
}

}  // namespace fastround
