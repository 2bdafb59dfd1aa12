#include "fastround/source/weight_input.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/strings.h"

namespace fastround {

namespace {

// An FP8 source (DeepSeek style) names its scale block and scale encoding in its quantization_config.
// The first quantization_config dict, depth first (multimodal configs nest it under text_config).
const ojson* find_quantization_config(const ojson& j) {
  if (j.is_object()) {
    auto it = j.find("quantization_config");
    if (it != j.end() && it->is_object()) return &*it;
    for (const auto& [k, v] : j.items())
      if (const ojson* q = find_quantization_config(v)) return q;
  } else if (j.is_array()) {
    for (const auto& v : j)
      if (const ojson* q = find_quantization_config(v)) return q;
  }
  return nullptr;
}

// An int-like config value as upstream reads one (ints, integral floats, digit strings; not bools).
std::optional<int64_t> int_like(const ojson& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::floor(d) == d) return static_cast<int64_t>(d);
  }
  if (v.is_string()) {
    const std::string t = v.get<std::string>();
    try {
      size_t used = 0;
      const int64_t n = std::stoll(t, &used);
      if (used == t.size() && !t.empty() && t[0] != '+') return n;
    } catch (const std::exception&) {
    }
  }
  return std::nullopt;
}

// A scale tensor of any numeric dtype in fp32, as upstream's .to(torch.float32).
std::vector<float> floats_of(const SafetensorsReader& r, const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  const uint8_t* p = r.data(t);
  for (int64_t i = 0; i < t.numel(); ++i) out[static_cast<size_t>(i)] = element_as_float(t.dtype, p, i);
  return out;
}

}  // namespace

SourceFormat read_source_format(const ojson& config) {
  SourceFormat fmt;
  if (config.contains("model_type") && config["model_type"].is_string()) {
    fmt.model_type = config["model_type"].get<std::string>();
    fmt.model_type = to_lower(fmt.model_type);
  }
  const ojson* found = find_quantization_config(config);
  const ojson q = found ? *found : ojson::object();
  if (q.contains("weight_block_size") && q["weight_block_size"].is_array() && q["weight_block_size"].size() == 2) {
    const auto br = int_like(q["weight_block_size"][0]), bc = int_like(q["weight_block_size"][1]);
    // Bounded so that block arithmetic on any weight shape stays far from overflow. An invalid block
    // matters only to FP8 weights, which then fail naming it (dequant's check_fp8_scale).
    const bool valid = br && bc && *br > 0 && *bc > 0 && *br <= (1 << 30) && *bc <= (1 << 30);
    fmt.fp8_block = valid ? std::pair<int64_t, int64_t>(*br, *bc) : std::pair<int64_t, int64_t>(-1, -1);
  }
  auto str = [&](const char* key) { return q.contains(key) && q[key].is_string() ? q[key].get<std::string>() : std::string(); };
  auto lower = [&](const char* key) {
    std::string v = str(key);
    v = to_lower(v);
    return v;
  };
  fmt.scale_e8m0 = str("scale_fmt") == "ue8m0";
  fmt.deepseek_v32_scales = fmt.model_type == "deepseek_v32" && str("quant_method") == "fp8" &&
                            lower("fmt") == "e4m3" && lower("scale_fmt") == "ue8m0";
  fmt.deepseek_mx_source = fmt.model_type == "deepseek_v4" || fmt.deepseek_v32_scales;
  fmt.int4_source = fmt.model_type == "kimi_k25";
  if (fmt.int4_source) {
    std::vector<const ojson*> cands{&q};
    if (q.contains("weights") && q["weights"].is_object()) cands.push_back(&q["weights"]);
    for (const ojson* c : cands) {
      for (const char* key : {"group_size", "weight_group_size"}) {
        if (fmt.int4_group || !c->contains(key)) continue;
        if (auto g = int_like((*c)[key]); g && *g > 0) fmt.int4_group = *g;
      }
    }
  }
  return fmt;
}

const char* source_format_name(InputKind k) {
  switch (k) {
    case InputKind::Fp8Scaled: return "FP8";
    case InputKind::MxfpSource: return "MXFP";
    case InputKind::Nvfp4Source: return "NVFP4";
    case InputKind::Int4Source: return "INT4";
    case InputKind::Raw: break;
  }
  return nullptr;
}

uint64_t WeightInput::nbytes() const {
  return static_cast<uint64_t>(rows * cols) * static_cast<uint64_t>(dtype_bits(dtype)) / 8;
}

Fp8ScaleView fp8_scale_view(const SourceFormat& ctx, const SafetensorsReader& sr, const TensorInfo& s) {
  Fp8ScaleView view;
  view.dtype = s.dtype;
  view.data = sr.data(s);
  view.numel = s.numel();
  view.rows = s.shape.size() == 2 ? s.shape[0] : 0;
  view.cols = s.shape.size() == 2 ? s.shape[1] : 0;
  if (ctx.fp8_block) std::tie(view.block_rows, view.block_cols) = *ctx.fp8_block;
  view.e8m0 = ctx.scale_e8m0;
  return view;
}

const void* materialize(const SourceFormat& ctx, const WeightInput& in, std::vector<uint16_t>& buf) {
  const uint8_t* raw = in.reader->data(*in.tensor) + in.byte_offset;
  if (in.kind == InputKind::Raw) return raw;
  buf.resize(static_cast<size_t>(in.rows * in.cols));
  const TensorInfo& s = *in.scale;
  if (in.kind == InputKind::Fp8Scaled) {
    dequant_fp8_scaled(raw, in.rows, in.cols, fp8_scale_view(ctx, *in.scale_reader, s), in.tensor->name, buf.data());
  } else if (in.kind == InputKind::MxfpSource) {
    const uint8_t* scale = in.owned_scale ? in.owned_scale->data() : in.scale_reader->data(s);
    dequant_mxfp_source(in.source_bits, raw, scale, in.rows, in.cols, buf.data());
  } else if (in.kind == InputKind::Nvfp4Source) {
    const std::vector<float> scale = floats_of(*in.scale_reader, s);
    dequant_nvfp4_source(raw, scale.data(), in.rows, in.cols, in.group_size, in.has_global, in.global_mult, buf.data());
  } else {
    Int4SourceView v;
    v.packed = raw;
    v.words32 = in.tensor->dtype == DType::I32;
    v.rows = in.rows;
    v.cols = in.cols;
    v.group = in.group_size;
    const std::vector<float> scale = floats_of(*in.scale_reader, s);
    v.scale = scale.data();
    std::vector<int16_t> zero;
    if (const TensorInfo* z = in.zero_point) {
      const uint8_t* zp = in.scale_reader->data(*z);
      v.zero_per_element = z->shape == in.tensor->shape && (z->dtype == DType::U8 || z->dtype == DType::I8);
      if (v.zero_per_element) {  // stored like the weight: unpack it the same way
        zero.resize(static_cast<size_t>(in.rows * in.cols));
        const int64_t row_bytes = in.cols / 2;
        for (int64_t r = 0; r < in.rows; ++r)
          for (int64_t c = 0; c < in.cols; ++c)
            zero[static_cast<size_t>(r * in.cols + c)] = static_cast<int16_t>(int4_nibble(zp + r * row_bytes, false, c));
      } else {
        zero.resize(static_cast<size_t>(z->numel()));
        for (int64_t i = 0; i < z->numel(); ++i) zero[static_cast<size_t>(i)] = element_as_int16(z->dtype, zp, i);
      }
      v.zero = zero.data();
    }
    dequant_int4_source(v, buf.data());
  }
  return buf.data();
}

}  // namespace fastround
