// Model-free quantization: safetensors shards in, a packed checkpoint out, no model and no framework.
// A library call usable without Python (see cpp/tools/fastround_model_free.cpp for the C++ CLI twin).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "fastround/pipeline/job.h"
#include "fastround/quant/scheme.h"

namespace fastround {

// Upstream release whose on-disk format this build reproduces; written as autoround_version.
inline constexpr const char* kAutoRoundCompatVersion = "0.16.1";


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
