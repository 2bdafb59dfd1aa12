// One source shard -> one output shard: how every source tensor is read (raw, a fused-expert slice, a
// dequantized FP8/MXFP source), what kernel it goes through, and where each source byte is accounted.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fastround/io/safetensors.h"
#include "fastround/match/patterns.h"
#include "fastround/pipeline/model_free.h"
#include "fastround/pipeline/resume.h"
#include "fastround/quant/encoding.h"
#include "fastround/quant/scheme.h"

namespace fastround {

struct Logger {
  const ModelFreeCallbacks* cb = nullptr;
  void operator()(LogLevel level, const std::string& msg) const {
    if (cb && cb->log) cb->log(level, msg);
  }
};

// Job-wide facts every shard plan reads; immutable once the run starts.
struct RunContext {
  const ModelFreeJob& job;
  SchemeFields default_scheme;
  const EncodingTraits* default_encoding;  // of the default scheme; INT GPTQ when that is full precision
  LayerConfig layer_config;
  std::unique_ptr<IgnoreMatcher> ignore{};
  Logger log{};
  std::string format = "auto_round";  // the first requested format
  bool fake_format = false;  // format "fake": NVFP4 writes dequantized weights
  bool llm_compressor = false;  // format "llm_compressor": compressed-tensors quantization_config
  bool opt_rtn = true;       // MXFP exponent search (upstream default unless disable_opt_rtn)
  std::optional<std::pair<int64_t, int64_t>> fp8_block{};  // weight_block_size of an FP8 source config
  bool scale_e8m0 = false;   // FP8 source with scale_fmt ue8m0
  std::string model_type{};  // config.json's, lower case
  bool deepseek_mx_source = false;   // deepseek_v4, or v32 with ue8m0 scales: weights + E8M0 block scales are MX
  bool deepseek_v32_scales = false;  // v32 also names those scales weight_scale / weight_scale_inv
  bool int4_source = false;          // kimi_k25: weight_packed + float weight_scale is INT4
  std::optional<int64_t> int4_group{};  // its config's group size, when the shapes do not say
  std::map<std::string, std::string> tensor_home{};  // tensor -> source shard, from the index
  SinkFactory make_sink = SafetensorsWriter::factory();  // where each output shard's tensors go
};

enum class InputKind { Raw, Fp8Scaled, MxfpSource, Nvfp4Source, Int4Source };

// A 2-D [rows, cols] view of a weight as the kernels consume it.
struct WeightInput {
  InputKind kind = InputKind::Raw;
  const SafetensorsReader* reader = nullptr;
  const TensorInfo* tensor = nullptr;
  uint64_t byte_offset = 0;  // start of this slice inside `tensor` (a fused-expert slice)
  DType dtype = DType::BF16;  // of the values the kernel sees (BF16 for every dequantized source)
  int64_t rows = 0, cols = 0;
  // Fp8Scaled: scale_inv; MxfpSource: E8M0 scale [rows, cols/32] and `bits` of the source; Nvfp4Source: block
  // scale [rows, cols/16]; Int4Source: scale [rows, cols/group].
  const SafetensorsReader* scale_reader = nullptr;
  const TensorInfo* scale = nullptr;
  std::shared_ptr<const std::vector<uint8_t>> owned_scale;  // built by the planner; replaces `scale`'s bytes
  int source_bits = 0;
  bool has_global = false;  // Nvfp4Source: multiply by global_mult (1 / weight_global_scale)
  float global_mult = 1.f;
  int64_t group_size = 0;                 // Int4Source
  const TensorInfo* zero_point = nullptr;  // Int4Source: [rows, groups], or packed like the weight
  uint64_t nbytes() const;
};

// A copy (no encoding) or one layer encoded through its table row.
struct WorkItem {
  const EncodingTraits* enc = nullptr;  // null: copy
  std::string name;  // copy: the output tensor; encoded: the layer
  WeightInput in;
  EncodingParams params{};
  bool fake = false;                  // write enc->fake_quantize's qdq weight instead of the packed tensors
  std::vector<TensorSpec> outputs;    // encoded: the row's tensors, written as <name>.<suffix>
  std::shared_ptr<const std::vector<uint8_t>> bytes;  // copy: write these instead of `in`'s tensor
};

// Where each source tensor went, for the run summary.
enum class Fate { Quantized, Kept, Dropped };
struct TensorFate {
  Fate fate;
  uint64_t bytes;
  std::string why;  // for kept/dropped tensors that are not plain non-weights
};

struct ShardPlan {
  std::string source_name, output_name;
  std::vector<WorkItem> items;
  std::vector<OutputTensor> outputs;  // in write order (= weight_map order)
  std::vector<std::string> quantized, ignored;
  std::map<std::string, TensorFate> fates;
  uint64_t source_bytes = 0;
};

// Resolves a tensor that lives in another shard (an FP8 scale donated across shards).
using DonorLookup = std::function<std::pair<const SafetensorsReader*, const TensorInfo*>(const std::string& tensor)>;

void plan_shard(const RunContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors, ShardPlan& plan);

// Writes the plan's output shard into `staging`; checks `cancel` and calls `after_tensor` between tensors.
void run_shard(const RunContext& ctx, const ShardPlan& plan, const std::filesystem::path& staging,
               const std::atomic<bool>& cancel, std::atomic<uint64_t>& bytes_done,
               const std::function<void()>& after_tensor);

// Counts and bytes per fate for the summary file.
ojson accounting_json(const ShardPlan& plan);

}  // namespace fastround
