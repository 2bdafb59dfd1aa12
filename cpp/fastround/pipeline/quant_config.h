// quantization_config for the output: upstream auto-round's dicts for INT, MXFP and NVFP4_E5M3, and the
// compressed-tensors dicts of format llm_compressor, key for key.
#pragma once

#include <string>
#include <vector>

#include "fastround/pipeline/shard_plan.h"

namespace fastround {

// `quantized` / `ignored`: layer names in shard order.
ojson build_quantization_config(const RunContext& ctx, const std::vector<std::string>& quantized,
                                const std::vector<std::string>& ignored);

}  // namespace fastround
