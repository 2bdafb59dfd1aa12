// How the kernels see one weight of a source checkpoint: the mapped bytes, a slice of a fused tensor, or a
// bf16 buffer decoded from an already-quantized source, and what the source's config says about those.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "fastround/io/safetensors.h"
#include "fastround/source/dequant.h"

namespace fastround {

using ojson = nlohmann::ordered_json;

// One description of the source format, read once from config.json (model type, FP8 block, scale
// encodings), instead of per-vendor flags spread over the run.
struct SourceFormat {
  std::optional<std::pair<int64_t, int64_t>> fp8_block{};  // weight_block_size of an FP8 source; (-1, -1): invalid
  bool scale_e8m0 = false;           // FP8 source with scale_fmt ue8m0
  std::string model_type{};          // config.json's, lower case
  bool deepseek_mx_source = false;   // deepseek_v4, or v32 with ue8m0 scales: weights + E8M0 block scales are MX
  bool deepseek_v32_scales = false;  // v32 also names those scales weight_scale / weight_scale_inv
  bool int4_source = false;          // kimi_k25: weight_packed + float weight_scale is INT4
  std::optional<int64_t> int4_group{};  // its config's group size, when the shapes do not say
};

// What the source's config says about already-quantized weights: the FP8 block and scale encoding, the
// model type's own formats (DeepSeek V4/V3.2 E8M0 scales, kimi_k25 INT4).
SourceFormat read_source_format(const ojson& config);

enum class InputKind { Raw, Fp8Scaled, MxfpSource, Nvfp4Source, Int4Source };

// Name of a quantized source kind for messages and the summary ("FP8", "MXFP", ...); null for Raw.
const char* source_format_name(InputKind k);

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

// How dequant_fp8_scaled reads an FP8 weight's scale_inv under the source's config.
Fp8ScaleView fp8_scale_view(const SourceFormat& fmt, const SafetensorsReader& sr, const TensorInfo& s);

// The input a kernel reads: the mapped bytes themselves, or `buf` filled by decoding a quantized source.
const void* materialize(const SourceFormat& fmt, const WeightInput& in, std::vector<uint16_t>& buf);

}  // namespace fastround
