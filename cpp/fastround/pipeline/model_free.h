// Model-free quantization: safetensors shards in, a packed checkpoint out, no model and no framework.
// A library call usable without Python (see cpp/tools/fastround_model_free.cpp for the C++ CLI twin).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "fastround/quant/scheme.h"

namespace fastround {

// Upstream release whose on-disk format this build reproduces; written as autoround_version.
inline constexpr const char* kAutoRoundCompatVersion = "0.16.1";

// Everything a run needs; also its JSON wire format between Python (or a job file) and the core.
struct ModelFreeJob {
  std::filesystem::path source_dir;
  std::filesystem::path output_dir;
  ojson scheme = "W4A16";          // preset name, or a dict of QuantizationScheme fields
  ojson overrides = ojson::object();  // explicit bits/group_size/sym/data_type/act_* arguments
  // Resolve unset act_* fields before validating, as upstream's AutoRound entry does; upstream's
  // ModelFreeCompressor class, called directly, leaves them unset.
  bool fill_act_defaults = true;
  ojson layer_config = ojson::object();
  std::string ignore_layers;
  bool quant_lm_head = false;
  bool quant_nontext_module = false;
  std::vector<std::string> detected_ignore;  // unpackable module names found by the transformers glue
  std::string format = "auto_round";
  int threads = 0;  // 0: OpenMP default
  // Pad in_features to whole groups like upstream (byte parity) instead of keeping such layers unquantized.
  bool pad_partial_groups = false;
  std::optional<bool> disable_opt_rtn;  // unset: MXFP searches the shared exponent (upstream default)
  int shard_parallelism = 0;            // shards in flight; 0: chosen from free memory
  // A streamed hub repo: source_dir holds its metadata; these weight files are fetched on demand.
  std::vector<std::string> remote_shards;
  std::string source_revision;          // hub commit of a streamed repo (part of the resume fingerprint)

  static ModelFreeJob from_json(const ojson& j);
  ojson to_json() const;
};

// The default scheme a job resolves to, with the label used in messages.
struct ResolvedScheme {
  SchemeFields fields;
  std::string label;
  std::string name;  // upper-cased preset name when given as a string, else empty
};
ResolvedScheme resolve_job_scheme(const ModelFreeJob& job);

struct ModelFreeProgress {
  int shard_index = 0;  // 1-based
  int shard_count = 0;
  std::string shard_name;
  uint64_t bytes_done = 0;   // source bytes consumed over the whole run
  uint64_t bytes_total = 0;
};

enum class LogLevel { Debug = 10, Info = 20, Warning = 30 };

struct ModelFreeCallbacks {
  // Called from the calling thread about every 100 ms; return false to cancel the run.
  std::function<bool(const ModelFreeProgress&)> progress;
  // Called from worker threads. Streaming: make `shard` available (download it into `dest_dir`, or find
  // it in a cache) and return its path; `upcoming` lists the shards needed next, to prefetch.
  std::function<std::string(const std::string& shard, const std::string& dest_dir,
                            const std::vector<std::string>& upcoming)>
      fetch_shard;
  // A fetched shard is no longer needed (delete it unless it was cached before the run).
  std::function<void(const std::string& shard)> release_shard;
  std::function<void(LogLevel, const std::string&)> log;
};

struct ModelFreeResult {
  std::filesystem::path output_dir;
  std::vector<std::string> quantized_layers;
  std::vector<std::string> ignored_layers;
  std::vector<std::string> shard_files;
  uint64_t source_bytes = 0;
  uint64_t output_bytes = 0;
  ojson quantization_config;
  ojson summary;  // what fastround_summary.json holds: tensors and bytes quantized, kept and dropped
};

// The weight index a source folder is read through: model.safetensors.index.json, else the first
// *.safetensors.index.json by name (upstream's rule); and its shards in first-appearance order.
std::optional<std::filesystem::path> find_weight_index(const std::filesystem::path& src);
std::vector<std::string> indexed_shards(const std::filesystem::path& src);

// A diffusers pipeline folder (no config.json, a transformer/ that has one), upstream's rule: the
// components model-free quantizes, "transformer" first, then every other "transformer*" folder with a
// config.json, by name. Empty for any other folder.
std::vector<std::string> diffusion_components(const std::filesystem::path& src);

ModelFreeResult run_model_free(const ModelFreeJob& job, const ModelFreeCallbacks& callbacks = {});

}  // namespace fastround
