// Which source tensors are weights and how each is read: fused 3-D experts split per expert, and the
// already-quantized source formats (FP8 block-scaled, MXFP, NVFP4 in three namings, kimi_k25 INT4, DeepSeek
// E8M0) recognised in upstream's order, with the tensors folded into each weight's input.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fastround/source/weight_input.h"

namespace fastround {

// A weight the planner has to decide about: a source tensor, or one expert of a fused 3-D tensor.
// A tensor written unchanged (or renamed) when an MX source passes through: from the source, or built here.
struct PassPart {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const TensorInfo* src = nullptr;
  std::shared_ptr<const std::vector<uint8_t>> bytes;
};

struct Candidate {
  std::string name;         // output name of the weight (…weight)
  std::string source;       // source tensor it reads
  WeightInput in;
  bool from_fused = false;
  // MxfpSource / Nvfp4Source: what is written when the target is the source's own format. Empty for an NVFP4
  // layer whose global scales are not single values.
  std::vector<PassPart> pass;
};


// Source tensors folded into another tensor's input (scales, global scales, zero points), with the reason
// the summary gives for dropping them.
using Folded = std::map<std::string, std::string>;
using ForeignScales = std::vector<std::pair<const SafetensorsReader*, const TensorInfo*>>;

// Resolves a tensor that lives in another shard (an FP8 scale donated across shards).
using DonorLookup = std::function<std::pair<const SafetensorsReader*, const TensorInfo*>(const std::string& tensor)>;

// What classification reads besides the shard itself.
struct ClassifyContext {
  const SourceFormat& fmt;
  const std::map<std::string, std::string>& tensor_home;  // tensor -> source shard, from the index
  std::function<void(const std::string&)> warn;
};

// "layer.name.weight" -> "layer.name".
std::string layer_of(const std::string& tensor_name);
// "[model_free] <shard path>: tensor '<name>'": how every message names a tensor.
std::string site_of(const SafetensorsReader& r, const std::string& tensor);

// Upstream's split of fused expert tensors [E, out, in]: gate_up_proj/w13 into row halves (the first
// ceil(out/2) rows are gate/w1), anything else per expert. Applies to 3-D tensors whose parent path ends
// with "experts" or "moe"; ".weight" is optional and vLLM's "<proj>_weight" / "_weight_scale" /
// "_weight_scale_2" / "_input_scale" suffixes name the output's last component.
bool split_fused(const SafetensorsReader& reader, const TensorInfo& t, std::vector<Candidate>& out);

// Decides how each already-quantized source weight is read, in upstream's order: skip-list layers stay as
// they are; DeepSeek E8M0 sources; NVFP4 naming; ModelOpt bare names; kimi_k25 INT4; MXFP4; NVFP4; MXFP8;
// FP8 with scale_inv.
void classify_quantized_sources(const ClassifyContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors,
                                const std::string& shard, std::vector<Candidate>& cands, Folded& folded,
                                ForeignScales& foreign_scales);

}  // namespace fastround
