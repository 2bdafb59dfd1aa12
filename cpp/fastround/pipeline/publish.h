// The output folder: where it may be, what in it is stale, and how finished files move into place from the
// staging folder so that a folder holding our config.json is always complete.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fastround/pipeline/shard_plan.h"

namespace fastround {

// Removes every nested quantization_config (a source's own) from a config.
void drop_quantization_configs(ojson& j);
// Quantization metadata of another tool, or a model card describing the unquantized model.
bool is_stale_metadata(const std::string& name);
bool is_weight_file(const std::string& name);
// Throws OptionError when `out` is empty, is or lies inside `src`, or exists as a file.
void check_output_location(const std::filesystem::path& src, const std::filesystem::path& out);
// Moves finished files from the staging folder into place; config.json last, so a folder that has
// our config.json is complete.
void publish(const std::filesystem::path& staging, const std::filesystem::path& out,
             const std::vector<std::string>& shard_files, Logger& log);

}  // namespace fastround
