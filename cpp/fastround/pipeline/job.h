// The description of a model-free run, as Python (or a job file) hands it to the core, and the default
// scheme it resolves to.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "fastround/quant/scheme.h"

namespace fastround {

// Everything a run needs; also its JSON wire format between Python (or a job file) and the core.
struct ModelFreeJob {
  std::filesystem::path source_dir;
  std::filesystem::path output_dir;
  ojson scheme = "W4A16";          // preset name, or a dict of QuantizationScheme fields
  ojson overrides = ojson::object();  // explicit bits/group_size/sym/data_type/act_* arguments
  // Resolve unset act_* fields before validating, as upstream's AutoRound entry does; upstream's
  // ModelFreeCompressor class, called directly, leaves them unset.
  bool fill_act_defaults = true;
  // The regular flow (calibrated) resolves its scheme here too: NVFP4 (data_type nv_fp), which model-free refuses
  // for want of calibrated global scales, is then accepted; everything else is validated as for model-free.
  bool regular_flow = false;
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

}  // namespace fastround
