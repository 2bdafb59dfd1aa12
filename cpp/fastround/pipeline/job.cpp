#include "fastround/pipeline/job.h"

#include <algorithm>
#include <set>

#include "fastround/common/error.h"

namespace fastround {

ModelFreeJob ModelFreeJob::from_json(const ojson& j) {
  if (!j.is_object()) throw OptionError("[model_free] job must be a JSON object");
  static const std::set<std::string> known = {"source_dir",  "output_dir",    "scheme",         "overrides",
                                              "layer_config", "ignore_layers", "quant_lm_head", "quant_nontext_module",
                                              "detected_ignore", "format",     "threads", "pad_partial_groups",
                                              "disable_opt_rtn", "shard_parallelism", "remote_shards",
                                              "source_revision", "fill_act_defaults", "regular_flow"};
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
    job.regular_flow = j.value("regular_flow", false);
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
  if (regular_flow) j["regular_flow"] = true;  // absent for model-free jobs, whose manifests predate it
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
  const SchemeFields& f = r.fields;
  const bool nvfp4 = f.data_type.value_or("") == "nv_fp" && f.bits.value_or(16) == 4 && f.group_size.value_or(0) == 16;
  if (!(job.regular_flow && nvfp4)) validate_model_free_scheme(r.fields, r.label);
  return r;
}

}  // namespace fastround
