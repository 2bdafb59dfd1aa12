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
#include "fastround/source/classify.h"

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
  SourceFormat source{};     // what config.json says about already-quantized weights
  std::map<std::string, std::string> tensor_home{};  // tensor -> source shard, from the index
  SinkFactory make_sink = SafetensorsWriter::factory();  // where each output shard's tensors go
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

void plan_shard(const RunContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors, ShardPlan& plan);

// Writes the plan's output shard into `staging`; checks `cancel` and calls `after_tensor` between tensors.
void run_shard(const RunContext& ctx, const ShardPlan& plan, const std::filesystem::path& staging,
               const std::atomic<bool>& cancel, std::atomic<uint64_t>& bytes_done,
               const std::function<void()>& after_tensor);

// Counts and bytes per fate for the summary file.
ojson accounting_json(const ShardPlan& plan);

}  // namespace fastround
