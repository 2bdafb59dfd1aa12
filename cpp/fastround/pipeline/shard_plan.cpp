#include "fastround/pipeline/shard_plan.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <set>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/nonfinite.h"
#include "fastround/source/dequant.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return s;
}

std::string layer_of(const std::string& tensor_name) {
  const size_t dot = tensor_name.rfind('.');
  return dot == std::string::npos ? tensor_name : tensor_name.substr(0, dot);
}

std::string last_part(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

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

// Upstream's split of fused expert tensors [E, out, in]: gate_up_proj/w13 into row halves (the first
// ceil(out/2) rows are gate/w1), anything else per expert. Applies to 3-D tensors whose parent path ends
// with "experts" or "moe"; ".weight" is optional and vLLM's "<proj>_weight" / "_weight_scale" /
// "_weight_scale_2" / "_input_scale" suffixes name the output's last component.
bool split_fused(const SafetensorsReader& reader, const TensorInfo& t, std::vector<Candidate>& out) {
  if (t.shape.size() != 3) return false;
  const std::string base = ends_with(t.name, ".weight") ? t.name.substr(0, t.name.size() - 7) : t.name;
  const std::string parent = layer_of(base);
  if (parent == base) return false;
  std::string prefix;
  if (ends_with(parent, "experts"))
    prefix = parent;
  else if (ends_with(parent, "moe"))
    prefix = parent + ".experts";
  else
    return false;
  std::string proj = last_part(base), suffix = "weight";
  for (const char* s : {"_weight_scale_2", "_weight_scale", "_weight", "_input_scale"}) {
    const std::string sfx = s;
    if (proj.size() > sfx.size() && ends_with(proj, sfx)) {
      proj = proj.substr(0, proj.size() - sfx.size());
      suffix = sfx.substr(1);
      break;
    }
  }
  const int64_t E = t.shape[0], rows = t.shape[1], cols = t.shape[2];
  if (E == 0 || rows == 0 || cols == 0)
    throw CheckpointError("[model_free] " + reader.path().string() + ": fused expert tensor '" + t.name +
                          "' has shape " + shape_str(t.shape) + " with no elements");
  const uint64_t esize = static_cast<uint64_t>(dtype_bits(t.dtype) / 8);
  const uint64_t expert_bytes = static_cast<uint64_t>(rows * cols) * esize;
  struct Part {
    std::string name;
    int64_t first, count;
  };
  std::vector<Part> parts;
  if (proj == "gate_up_proj" || proj == "w13") {
    const bool w = proj == "w13";
    const int64_t head = (rows + 1) / 2;  // torch.chunk: ceil halves
    parts = {{w ? "w1" : "gate_proj", 0, head}, {w ? "w3" : "up_proj", head, rows - head}};
  } else {
    parts = {{proj, 0, rows}};
  }
  for (int64_t e = 0; e < E; ++e) {
    for (const auto& p : parts) {
      Candidate c;
      c.name = prefix + "." + std::to_string(e) + "." + p.name + "." + suffix;
      c.source = t.name;
      c.from_fused = true;
      c.in.reader = &reader;
      c.in.tensor = &t;
      c.in.byte_offset = static_cast<uint64_t>(e) * expert_bytes + static_cast<uint64_t>(p.first * cols) * esize;
      c.in.dtype = t.dtype;
      c.in.rows = p.count;
      c.in.cols = cols;
      out.push_back(std::move(c));
    }
  }
  return true;
}

std::string site_of(const SafetensorsReader& r, const std::string& tensor) {
  return "[model_free] " + r.path().string() + ": tensor '" + tensor + "'";
}

// Source tensors folded into another tensor's input (scales, global scales, zero points), with the reason
// the summary gives for dropping them.
using Folded = std::map<std::string, std::string>;
using ForeignScales = std::vector<std::pair<const SafetensorsReader*, const TensorInfo*>>;

const char* source_format(InputKind k) {
  switch (k) {
    case InputKind::Fp8Scaled: return "FP8";
    case InputKind::MxfpSource: return "MXFP";
    case InputKind::Nvfp4Source: return "NVFP4";
    case InputKind::Int4Source: return "INT4";
    case InputKind::Raw: break;
  }
  return nullptr;
}

bool is_byte_dtype(DType d) { return d == DType::U8 || d == DType::I8; }
bool is_float_dtype(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32 || d == DType::F64; }

// Scales are read with element_as_float; any other dtype is refused while planning, naming the tensor.
void check_readable_scale(const SafetensorsReader& r, const TensorInfo& t) {
  if (!element_readable_as_float(t.dtype))
    throw CheckpointError(site_of(r, t.name) + " has dtype " + std::string(dtype_name(t.dtype)) +
                          ", which is not a number a scale can hold");
}

float scalar_of(const SafetensorsReader& r, const TensorInfo& t) {
  if (t.numel() != 1)
    throw CheckpointError(site_of(r, t.name) + " has shape " + shape_str(t.shape) + "; a global scale has one element");
  check_readable_scale(r, t);
  return element_as_float(t.dtype, r.data(t), 0);
}

// How dequant_fp8_scaled reads an FP8 weight's scale_inv under the source config.
Fp8ScaleView fp8_scale_view(const RunContext& ctx, const SafetensorsReader& sr, const TensorInfo& s) {
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

// An MX source (weight or weight_packed with an E8M0 weight_scale [rows, cols/32]) read through `scale`;
// `pass` defaults to the two source tensors as they are.
void as_mx_source(const SafetensorsReader& reader, Candidate& c, const std::string& layer, int bits,
                  const SafetensorsReader& sr, const TensorInfo& scale, Folded& folded) {
  const TensorInfo& w = *c.in.tensor;
  const int64_t rows = w.shape[0], cols = bits == 8 ? w.shape[1] : w.shape[1] * 2;
  if (cols % 32 != 0)
    throw CheckpointError(site_of(reader, w.name) + ": in_features " + std::to_string(cols) +
                          " is not a multiple of the MX group of 32");
  if (!c.in.owned_scale && scale.shape != std::vector<int64_t>{rows, cols / 32})
    throw CheckpointError(site_of(sr, scale.name) + " has shape " + shape_str(scale.shape) + "; the MX scale of " +
                          w.name + " " + shape_str(w.shape) + " is [" + std::to_string(rows) + ", " +
                          std::to_string(cols / 32) + "]");
  c.in.kind = InputKind::MxfpSource;
  c.in.source_bits = bits;
  c.in.cols = cols;
  c.in.dtype = DType::BF16;
  c.in.scale_reader = &sr;
  c.in.scale = &scale;
  c.name = layer + ".weight";
  c.pass = {{w.name, w.dtype, w.shape, &w, nullptr}, {scale.name, scale.dtype, scale.shape, &scale, nullptr}};
  if (&sr == &reader) folded[scale.name] = "MX scale folded into the dequantized weight";
}

// DeepSeek V4 / V3.2: an FP8 weight (MXFP8) or int8/uint8 weight (MXFP4 bytes) with an E8M0 block scale.
void as_deepseek_mx(const SafetensorsReader& reader, Candidate& c, const std::string& layer,
                    const SafetensorsReader& sr, const TensorInfo& scale, Folded& folded) {
  const TensorInfo& w = *c.in.tensor;
  const bool fp8 = w.dtype == DType::F8_E4M3;
  const int64_t rows = w.shape[0], cols = fp8 ? w.shape[1] : w.shape[1] * 2;
  const std::string site = site_of(reader, w.name);
  if (cols % 32 != 0)
    throw CheckpointError(site + ": in_features " + std::to_string(cols) + " is not a multiple of the MX group of 32");
  if (scale.shape.size() != 2)
    throw CheckpointError(site_of(sr, scale.name) + " has shape " + shape_str(scale.shape) +
                          "; an E8M0 block scale is 2-D");
  const int64_t n = scale.numel();
  std::vector<uint8_t> bytes(static_cast<size_t>(n));
  if (fp8 && scale.dtype == DType::F32) {
    // fp32 scales holding UE8M0 values: the exponent field is the E8M0 byte.
    const uint32_t* p = reinterpret_cast<const uint32_t*>(sr.data(scale));
    for (int64_t i = 0; i < n; ++i) bytes[static_cast<size_t>(i)] = static_cast<uint8_t>((p[i] >> 23) & 0xFF);
  } else if (dtype_bits(scale.dtype) == 8) {
    std::copy(sr.data(scale), sr.data(scale) + n, bytes.begin());
  } else {
    throw CheckpointError(site_of(sr, scale.name) + " has dtype " + std::string(dtype_name(scale.dtype)) +
                          "; a DeepSeek E8M0 scale is one byte per block (fp32 only beside FP8 weights)");
  }
  auto expanded = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(rows * (cols / 32)));
  expand_e8m0_block_scale(bytes.data(), scale.shape[0], scale.shape[1], rows, cols,
                          site + " (scale '" + scale.name + "' in " + sr.path().filename().string() + ")",
                          expanded->data());
  c.in.owned_scale = expanded;
  as_mx_source(reader, c, layer, fp8 ? 8 : 4, sr, scale, folded);
  c.pass = {{layer + (fp8 ? ".weight" : ".weight_packed"), fp8 ? DType::F8_E4M3 : DType::U8,
             {rows, fp8 ? cols : cols / 2}, &w, nullptr},
            {layer + ".weight_scale", DType::U8, {rows, cols / 32}, nullptr, expanded}};
  if (&sr == &reader) folded[scale.name] = "E8M0 block scale expanded into the MX weight_scale";
}

// kimi_k25 INT4: weight_packed (uint8/int8 bytes or int32 words) with a float scale and optional zero point.
void as_int4(const RunContext& ctx, const SafetensorsReader& reader, Candidate& c, const std::string& layer,
             const TensorInfo& scale, Folded& folded) {
  const TensorInfo& w = *c.in.tensor;
  const std::string site = site_of(reader, w.name);
  const int64_t rows = w.shape[0], cols = w.shape[1] * (w.dtype == DType::I32 ? 8 : 2);
  const int64_t groups = scale.shape[1];
  std::optional<int64_t> inferred;
  if (groups > 0 && cols % groups == 0) inferred = cols / groups;
  const std::optional<int64_t> group = inferred ? inferred : ctx.int4_group;
  if (!group || *group <= 0)
    throw CheckpointError(site + ": cannot tell the INT4 group size from packed " + shape_str(w.shape) + " and scale " +
                          shape_str(scale.shape) + ", and the config names none");
  if (cols % *group != 0)
    throw CheckpointError(site + ": in_features " + std::to_string(cols) + " is not a multiple of group_size " +
                          std::to_string(*group));
  if (inferred && ctx.int4_group && *inferred != *ctx.int4_group)
    ctx.log(LogLevel::Warning, site + ": INT4 group_size " + std::to_string(*inferred) + " from the shapes, " +
                                   std::to_string(*ctx.int4_group) + " in the config; using the shapes'");
  if (scale.shape[0] != rows || scale.shape[1] != cols / *group)
    throw CheckpointError(site_of(reader, scale.name) + " has shape " + shape_str(scale.shape) + "; expected [" +
                          std::to_string(rows) + ", " + std::to_string(cols / *group) + "]");
  const TensorInfo* zp = reader.find(layer + ".weight_zero_point");
  if (!zp) zp = reader.find(layer + ".zero_point");
  if (zp) {
    const bool packed_like = zp->shape == w.shape && is_byte_dtype(zp->dtype);
    if (zp->shape.size() != 2 || zp->shape[0] != rows || (!packed_like && zp->shape[1] != cols / *group))
      throw CheckpointError(site_of(reader, zp->name) + " has shape " + shape_str(zp->shape) +
                            "; an INT4 zero point is [rows, groups] or packed like the weight");
    if (zp->dtype != DType::I64) check_readable_scale(reader, *zp);  // element_as_int16 reads I64 too
    folded[zp->name] = "INT4 zero point folded into the dequantized weight";
  }
  c.in.kind = InputKind::Int4Source;
  c.in.cols = cols;
  c.in.dtype = DType::BF16;
  c.in.scale_reader = &reader;
  c.in.scale = &scale;
  c.in.group_size = *group;
  c.in.zero_point = zp;
  c.name = layer + ".weight";
  folded[scale.name] = "INT4 scale folded into the dequantized weight";
  if (const TensorInfo* ws = reader.find(layer + ".weight_shape")) folded[ws->name] = "INT4 shape record, not needed once unpacked";
}

// NVFP4 in compressed-tensors naming (weight_packed, weight_global_scale = divisor) or the legacy ModelOpt
// naming (weight uint8, weight_scale_2 = multiplier, input_scale); dequantized to bf16 for any target.
void as_nvfp4(const SafetensorsReader& reader, Candidate& c, const std::string& layer, const TensorInfo& scale,
              Folded& folded) {
  const TensorInfo& w = *c.in.tensor;
  const std::string site = site_of(reader, w.name);
  const int64_t rows = w.shape[0], cols = w.shape[1] * 2;
  if (cols % 16 != 0 || scale.numel() != rows * (cols / 16))
    throw CheckpointError(site + ": NVFP4 weight " + shape_str(w.shape) + " needs a block scale of [" +
                          std::to_string(rows) + ", " + std::to_string(cols / 16) + "], found " + shape_str(scale.shape));
  check_readable_scale(reader, scale);
  const TensorInfo* ws2 = reader.find(layer + ".weight_scale_2");
  const TensorInfo* wgs = reader.find(layer + ".weight_global_scale");
  // ModelOpt's weight_scale_2 multiplies; upstream turns it into the compressed-tensors divisor fp32(1 / s2)
  // and multiplies by its reciprocal again. An existing weight_global_scale is already that divisor
  // (upstream inverts it a second time: docs/compatibility.md).
  std::optional<float> divisor;
  if (wgs)
    divisor = scalar_of(reader, *wgs);
  else if (ws2)
    divisor = 1.0f / scalar_of(reader, *ws2);
  c.in.kind = InputKind::Nvfp4Source;
  c.in.cols = cols;
  c.in.dtype = DType::BF16;
  c.in.scale_reader = &reader;
  c.in.scale = &scale;
  c.in.group_size = 16;
  c.in.has_global = divisor.has_value();
  c.in.global_mult = divisor ? (*divisor == 0.0f ? 0.0f : 1.0f / *divisor) : 1.0f;
  c.name = layer + ".weight";
  // Passed through under an nv_fp target in compressed-tensors naming, as upstream normalises it: uint8
  // weight_packed, the block scale as it is, and fp32 [1] divisors (ModelOpt's multipliers inverted).
  const TensorInfo* igs = reader.find(layer + ".input_global_scale");
  const TensorInfo* is = reader.find(layer + ".input_scale");
  auto divisor_part = [&](const std::string& name, const TensorInfo* div, const TensorInfo* mult) {
    const TensorInfo* t = div ? div : mult;
    if (!t || t->numel() != 1) return false;
    const float v = element_as_float(t->dtype, reader.data(*t), 0);
    auto bytes = std::make_shared<std::vector<uint8_t>>(4);
    const float d = div ? v : 1.0f / v;
    std::memcpy(bytes->data(), &d, 4);
    c.pass.push_back({name, DType::F32, {1}, nullptr, bytes});
    return true;
  };
  const bool legacy = !ends_with(w.name, ".weight_packed");
  c.pass = {{layer + ".weight_packed", legacy ? DType::U8 : w.dtype, w.shape, &w, nullptr},
            {scale.name, scale.dtype, scale.shape, &scale, nullptr}};
  const bool single = (divisor_part(layer + ".weight_global_scale", wgs, ws2) || (!wgs && !ws2)) &&
                      (divisor_part(layer + ".input_global_scale", igs, is) || (!igs && !is));
  if (!single) c.pass.clear();
  for (const char* sfx : {".weight_scale", ".weight_scale_2", ".weight_global_scale", ".input_scale", ".input_global_scale"})
    if (const TensorInfo* t = reader.find(layer + sfx)) folded[t->name] = "NVFP4 scale folded into the dequantized weight";
}

// ModelOpt / TensorRT-LLM NVFP4 under a bare name: uint8 `X` [rows, cols/2] with `X.scale` (per block) and
// `X.scale2` (global multiplier). Upstream dequantizes X to bf16 under its own name and drops the metadata.
bool as_modelopt_nvfp4(const RunContext& ctx, const SafetensorsReader& reader, const std::string& shard, Candidate& c,
                       Folded& folded) {
  const TensorInfo& x = *c.in.tensor;
  if (x.dtype != DType::U8) return false;
  const std::string sname = x.name + ".scale", s2name = x.name + ".scale2";
  auto home = [&](const std::string& n) {
    auto it = ctx.tensor_home.find(n);
    return it == ctx.tensor_home.end() ? std::string() : it->second;
  };
  const TensorInfo* scale = reader.find(sname);
  const TensorInfo* scale2 = reader.find(s2name);
  if (!(scale || !home(sname).empty()) || !(scale2 || !home(s2name).empty())) return false;
  const std::string site = site_of(reader, x.name);
  if (!scale || !scale2)
    throw CheckpointError(site + ": its NVFP4 scales '" + sname + "' / '" + s2name + "' are in shard '" +
                          (scale ? home(s2name) : home(sname)) + "', not '" + shard +
                          "'; model-free reads ModelOpt scales only from the weight's own shard");
  if (x.shape.size() != 2)
    throw CheckpointError(site + " has shape " + shape_str(x.shape) +
                          ": a ModelOpt NVFP4 weight with more than two dimensions is not supported");
  const int64_t rows = x.shape[0], cols = x.shape[1] * 2;
  if (scale->shape.size() != 2 || scale->shape[0] != rows || scale->shape[1] == 0 || cols % scale->shape[1] != 0)
    throw CheckpointError(site_of(reader, sname) + " has shape " + shape_str(scale->shape) +
                          "; expected [" + std::to_string(rows) + ", groups] for NVFP4 weight " + shape_str(x.shape));
  if (scale2->numel() < 1) throw CheckpointError(site_of(reader, s2name) + " is empty");
  check_readable_scale(reader, *scale);
  check_readable_scale(reader, *scale2);
  c.in.kind = InputKind::Nvfp4Source;
  c.in.cols = cols;
  c.in.dtype = DType::BF16;
  c.in.scale_reader = &reader;
  c.in.scale = scale;
  c.in.group_size = cols / scale->shape[1];
  c.in.has_global = true;
  c.in.global_mult = element_as_float(scale2->dtype, reader.data(*scale2), 0);
  for (const char* sfx : {".scale", ".scale2", ".input_amax", ".weight_amax", ".original_shape"})
    if (const TensorInfo* t = reader.find(x.name + sfx)) folded[t->name] = "ModelOpt NVFP4 metadata, not needed once dequantized";
  return true;
}

// Decides how each already-quantized source weight is read, in upstream's order: skip-list layers stay as
// they are; DeepSeek E8M0 sources; NVFP4 naming; ModelOpt bare names; kimi_k25 INT4; MXFP4; NVFP4; MXFP8;
// FP8 with scale_inv.
void classify_quantized_sources(const RunContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors,
                                const std::string& shard, std::vector<Candidate>& cands, Folded& folded,
                                ForeignScales& foreign_scales) {
  for (auto& c : cands) {
    const TensorInfo* t = c.in.tensor;
    if (c.from_fused || t->shape.size() < 2) continue;
    const bool is_weight = ends_with(c.name, ".weight");
    const bool is_packed = ends_with(c.name, ".weight_packed");
    if (!is_weight && !is_packed) {
      as_modelopt_nvfp4(ctx, reader, shard, c, folded);
      continue;
    }
    if (t->shape.size() != 2) continue;
    const std::string layer = layer_of(c.name);
    auto find = [&](const char* sfx) { return reader.find(layer + sfx); };
    const DType dt = t->dtype;

    // FP8 scale_inv, possibly donated by another shard (DeepSeek V3.2 may also pair it with MXFP4 bytes).
    const SafetensorsReader* inv_reader = &reader;
    const TensorInfo* inv = nullptr;
    if (is_weight && (dt == DType::F8_E4M3 || (ctx.deepseek_v32_scales && is_byte_dtype(dt)))) {
      const std::string sname = layer + ".weight_scale_inv";
      inv = reader.find(sname);
      if (!inv) {
        auto it = ctx.tensor_home.find(sname);
        if (it != ctx.tensor_home.end() && it->second != shard) std::tie(inv_reader, inv) = donors(sname);
      }
    }
    if (is_always_skipped(c.name)) {
      // Upstream keeps skip-list layers (routers) as they are, an FP8 one with its scale even when donated.
      if (inv && dt == DType::F8_E4M3 && inv_reader != &reader) foreign_scales.push_back({inv_reader, inv});
      continue;
    }
    if (ctx.deepseek_mx_source && is_weight && (dt == DType::F8_E4M3 || is_byte_dtype(dt))) {
      const SafetensorsReader* sr = &reader;
      const TensorInfo* s = find(".scale");
      if (!s && ctx.deepseek_v32_scales) s = find(".weight_scale");
      if (!s && ctx.deepseek_v32_scales && inv) std::tie(sr, s) = std::make_pair(inv_reader, inv);
      if (s) {
        as_deepseek_mx(reader, c, layer, *sr, *s, folded);
        continue;
      }
    }
    const TensorInfo* ws = find(".weight_scale");
    if (ws && (is_byte_dtype(dt) || (dt == DType::I32 && is_packed))) {
      const bool globals = find(".weight_scale_2") || find(".input_scale") || find(".weight_global_scale") ||
                           find(".input_global_scale");
      // Upstream renames a uint8/int8 `weight` to `weight_packed` only for an NVFP4-looking layer.
      const bool packed = is_packed || (is_byte_dtype(dt) && globals && !find(".weight_packed"));
      if (!packed) continue;
      if (ctx.int4_source && is_packed && is_float_dtype(ws->dtype) && ws->shape.size() == 2) {
        as_int4(ctx, reader, c, layer, *ws, folded);
      } else if (!is_byte_dtype(dt)) {
        continue;
      } else if (!globals && ws->dtype == DType::U8) {
        as_mx_source(reader, c, layer, 4, reader, *ws, folded);
      } else {
        as_nvfp4(reader, c, layer, *ws, folded);
      }
      continue;
    }
    if (is_weight && dt == DType::F8_E4M3 && ws && ws->dtype == DType::U8) {
      as_mx_source(reader, c, layer, 8, reader, *ws, folded);
      continue;
    }
    if (is_weight && dt == DType::F8_E4M3 && inv) {
      std::string site = site_of(reader, t->name);
      if (inv_reader != &reader) site += " (weight_scale_inv in " + inv_reader->path().filename().string() + ")";
      check_fp8_scale(t->shape[0], t->shape[1], fp8_scale_view(ctx, *inv_reader, *inv), site);
      c.in.kind = InputKind::Fp8Scaled;
      c.in.dtype = DType::BF16;
      c.in.scale_reader = inv_reader;
      c.in.scale = inv;
      if (inv_reader == &reader) folded[inv->name] = "FP8 scale folded into the dequantized weight";
    }
  }
}

}  // namespace

uint64_t WeightInput::nbytes() const {
  return static_cast<uint64_t>(rows * cols) * static_cast<uint64_t>(dtype_bits(dtype)) / 8;
}

void plan_shard(const RunContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors, ShardPlan& plan) {
  const std::string& shard = plan.source_name;
  // Tensors folded into another one's input are all known before the loop below reaches any of them.
  Folded consumed;
  std::vector<Candidate> cands;
  ForeignScales foreign_scales;  // donated FP8 scales kept beside their router
  for (const TensorInfo& t : reader.tensors()) {
    plan.source_bytes += t.nbytes();
    if (split_fused(reader, t, cands)) continue;
    Candidate c;
    c.name = t.name;
    c.source = t.name;
    c.in.reader = &reader;
    c.in.tensor = &t;
    c.in.dtype = t.dtype;
    if (t.shape.size() == 2) {
      c.in.rows = t.shape[0];
      c.in.cols = t.shape[1];
    }
    cands.push_back(std::move(c));
  }

  classify_quantized_sources(ctx, reader, donors, shard, cands, consumed, foreign_scales);

  for (const auto& [sr, s] : foreign_scales) {
    Candidate c;
    c.name = c.source = s->name;
    c.in.reader = sr;
    c.in.tensor = s;
    c.in.dtype = s->dtype;
    if (s->shape.size() == 2) {
      c.in.rows = s->shape[0];
      c.in.cols = s->shape[1];
    }
    cands.push_back(std::move(c));
  }

  std::set<std::string> written;
  auto emit = [&](const std::string& name, DType dt, std::vector<int64_t> shape) {
    if (!written.insert(name).second)
      throw CheckpointError("[model_free] " + reader.path().string() + ": two source tensors would both be written as '" +
                            name + "' (e.g. a fused expert tensor next to per-expert tensors); refusing to write it twice");
    plan.outputs.push_back({name, dt, std::move(shape)});
  };
  auto fate = [&](const std::string& source, Fate f, uint64_t bytes, const std::string& why) {
    auto it = plan.fates.find(source);
    if (it == plan.fates.end()) {
      plan.fates.emplace(source, TensorFate{f, bytes, why});
    } else if (f == Fate::Quantized) {
      it->second.fate = Fate::Quantized;  // a fused tensor counts as quantized when its experts are
      it->second.why.clear();
    }
  };

  std::set<std::string> ignored_seen;
  for (auto& c : cands) {
    const TensorInfo& t = *c.in.tensor;
    if (auto f = consumed.find(c.name); f != consumed.end()) {
      fate(c.source, Fate::Dropped, t.nbytes(), f->second);
      continue;
    }
    if (ends_with(c.name, ".weight_scale_inv")) {
      auto it = ctx.tensor_home.find(layer_of(c.name) + ".weight");
      if (it != ctx.tensor_home.end() && it->second != shard) {
        if (is_always_skipped(it->first))
          fate(c.source, Fate::Kept, t.nbytes(), "written beside its FP8 router in the output of '" + it->second + "'");
        else
          fate(c.source, Fate::Dropped, t.nbytes(), "FP8 scale donated to '" + it->second + "'");
        continue;
      }
    }
    const bool is_weight = ends_with(c.name, ".weight");
    const int64_t dims = c.from_fused || c.in.kind != InputKind::Raw ? 2 : static_cast<int64_t>(t.shape.size());
    const std::string layer = layer_of(c.name);
    std::string keep_why;
    bool quantize = is_weight && dims >= 2;
    if (quantize && ctx.ignore->matches(layer) && !ctx.layer_config.has_key(layer)) {
      quantize = false;
      keep_why = "ignored layer";
    }
    if (quantize && is_always_skipped(c.name)) {
      quantize = false;
      keep_why = "built-in skip list (embed, conv, gate)";
    }
    std::optional<SchemeFields> eff;
    const LayerOverride* entry = nullptr;
    if (quantize) {
      entry = ctx.layer_config.match(layer);
      eff = resolve_layer_scheme(ctx.default_scheme, entry);
      if (!eff || eff->bits.value_or(16) >= 16) {
        quantize = false;
        keep_why = "full precision by scheme/layer_config";
      }
    }
    if (quantize && dims != 2)
      throw CheckpointError(site_of(reader, c.name) + " has shape " + shape_str(t.shape) +
                            ": a " + std::to_string(dims) +
                            "-D weight that no model-free rule understands (fused experts are split only under "
                            "'...experts' or '...moe'); add it to ignore_layers to keep it unquantized");
    WorkItem item;
    item.in = c.in;
    // Model-free has no NVFP4 ('nv_fp') kernel: upstream passes an NVFP4 source layer through and runs
    // anything else through its INT kernel under the nv_fp label.
    bool nv_pass = false;
    if (quantize && lower(eff->data_type.value_or("")).find("nv_fp") != std::string::npos) {
      const std::string from = entry ? " (from layer_config['" + entry->key + "'])" : "";
      const std::string site = site_of(reader, c.name) + ": data_type '" + *eff->data_type + "'" + from;
      if (c.in.kind != InputKind::Nvfp4Source || eff->bits.value_or(16) != 4)
        throw OptionError(site + " with bits=" + std::to_string(eff->bits.value_or(16)) +
                          ": model-free writes NVFP4 only by passing a 4-bit NVFP4 source layer through, and this "
                          "weight is " + (source_format(c.in.kind) ? source_format(c.in.kind) : "not quantized") +
                          "; use NVFP4_E5M3, MXFP4 or INT instead");
      if (c.pass.empty())
        throw CheckpointError(site + ": its NVFP4 global scales are not single values, so the layer cannot pass "
                              "through as NVFP4");
      nv_pass = true;
    }
    if (quantize && !nv_pass) {
      const std::string site = site_of(reader, c.name) + (c.from_fused ? " (an expert of '" + c.source + "')" : "");
      const std::string from = entry ? " (from layer_config['" + entry->key + "'])" : "";
      const EncodingTraits* enc = nullptr;
      try {
        enc = encoding_for(*eff, ctx.format);
      } catch (const OptionError& e) {
        throw OptionError(site + ": " + e.what() + from + "; model-free cannot write it");
      }
      if (!dtype_is_float_weight(c.in.dtype))
        throw OptionError(site + " has dtype " + std::string(dtype_name(c.in.dtype)) +
                          "; model-free quantizes F32, F16 and BF16 weights and the quantized sources it can read "
                          "(FP8 with weight_scale_inv, MXFP, NVFP4 with its scales, kimi_k25 INT4, DeepSeek E8M0); "
                          "ignore the layer to keep it as is");
      const int64_t rows = c.in.rows, cols = c.in.cols;
      if (rows <= 0 || cols <= 0)
        throw CheckpointError(site + " has shape " + shape_str(t.shape) + ": an empty weight cannot be quantized");
      item.params = encoding_params(*enc, *eff, ctx.opt_rtn);
      const int64_t g = item.params.group_size;
      if (g == 0 || g < -1)
        throw OptionError(site + ": group_size must be -1 or positive, got " + std::to_string(g) + from);
      if (!enc->full_groups(cols, item.params) && !(enc->pads_partial_groups && ctx.job.pad_partial_groups)) {
        if (enc->pads_partial_groups) {
          // A padded qweight loads in neither upstream's loader nor vLLM; keep the weight (docs/compatibility.md).
          ctx.log(LogLevel::Warning, "[model_free] " + c.name + ": in_features " + std::to_string(cols) +
                                         " is not a multiple of group_size " + std::to_string(g) +
                                         "; keeping it in full precision (pad_partial_groups=True pads like upstream)");
          keep_why = "in_features not a multiple of group_size";
        } else {
          // Upstream's kernel raises here and keeps the weight; so do we, loudly.
          ctx.log(LogLevel::Warning, "[model_free] " + c.name + ": in_features " + std::to_string(cols) +
                                         " is not a multiple of " + std::to_string(enc->fixed_group) +
                                         "; keeping the original weight");
          keep_why = "in_features not a multiple of the FP group";
        }
        quantize = false;
      } else {
        try {
          item.outputs = enc->layout(c.in.rows, cols, item.params, c.in.dtype);
          item.enc = enc;
          item.fake = ctx.fake_format && enc->fake_quantize;
          if (item.fake) item.outputs = {{"weight", c.in.dtype, {c.in.rows, cols}}};
        } catch (const OptionError& e) {
          ctx.log(LogLevel::Warning, std::string(e.what()) + " (" + c.name + "); keeping the original weight");
          quantize = false;
          keep_why = "shape the kernel cannot pack";
        }
      }
    }
    // An MX source whose target is the same MX encoding passes through byte for byte, as does an NVFP4 one.
    if (nv_pass || (quantize && c.in.kind == InputKind::MxfpSource && item.enc->data_type == "mx_fp" &&
                    item.params.bits == c.in.source_bits)) {
      for (const PassPart& p : c.pass) {
        WorkItem copy;
        copy.name = p.name;
        copy.bytes = p.bytes;
        if (p.src) {
          copy.in.reader = &reader;
          copy.in.tensor = p.src;
          copy.in.dtype = p.src->dtype;
        }
        emit(p.name, p.dtype, p.shape);
        plan.items.push_back(std::move(copy));
      }
      fate(c.source, Fate::Quantized, t.nbytes(), "");
      if (c.in.scale_reader == &reader) fate(c.in.scale->name, Fate::Quantized, c.in.scale->nbytes(), "");
      for (const char* sfx : {".weight_global_scale", ".weight_scale_2", ".input_global_scale", ".input_scale"})
        if (const TensorInfo* g = nv_pass ? reader.find(layer + sfx) : nullptr)
          fate(g->name, Fate::Quantized, g->nbytes(), "");
      plan.quantized.push_back(layer);
      continue;
    }
    if (quantize) {
      item.name = layer;
      for (const TensorSpec& o : item.outputs) emit(layer + "." + o.suffix, o.dtype, o.shape);
      plan.quantized.push_back(layer);
      fate(c.source, Fate::Quantized, t.nbytes(), "");
    } else {
      item.name = c.name;
      if (c.in.kind == InputKind::Raw && !c.from_fused) {
        emit(c.name, t.dtype, t.shape);
      } else {
        emit(c.name, c.in.dtype, {c.in.rows, c.in.cols});
      }
      if (is_weight && dims >= 2 && ignored_seen.insert(layer).second) plan.ignored.push_back(layer);
      std::string why = keep_why;
      if (c.from_fused) why = "split per expert" + (why.empty() ? "" : ", " + why);
      if (const char* from = source_format(c.in.kind))
        why = std::string(from) + " dequantized to bf16" + (why.empty() ? "" : ", " + why);
      if (c.in.reader == &reader) fate(c.source, Fate::Kept, t.nbytes(), why);  // a donated tensor counts in its own shard
    }
    plan.items.push_back(std::move(item));
  }
}

namespace {

// A scale tensor of any numeric dtype in fp32, as upstream's .to(torch.float32).
std::vector<float> floats_of(const SafetensorsReader& r, const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  const uint8_t* p = r.data(t);
  for (int64_t i = 0; i < t.numel(); ++i) out[static_cast<size_t>(i)] = element_as_float(t.dtype, p, i);
  return out;
}

// The input a kernel reads: the mapped bytes themselves, or a bf16 buffer dequantized from a quantized source.
const void* materialize(const RunContext& ctx, const WeightInput& in, std::vector<uint16_t>& buf) {
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

// Upstream quantizes such a weight into NaN scales without a word (docs/compatibility.md).
std::string nonfinite_message(const WeightInput& in, const std::string& layer, int64_t bad) {
  const std::string what = in.kind == InputKind::Raw ? "holds" : "dequantizes to";
  return "[model_free] " + in.reader->path().string() + ": tensor '" + in.tensor->name + "' (layer '" + layer + "') " +
         what + " " + std::to_string(bad) + " NaN/Inf value(s) of " + std::to_string(in.rows * in.cols) +
         "; refusing to quantize it (ignore the layer to keep it as is)";
}

}  // namespace

void run_shard(const RunContext& ctx, const ShardPlan& plan, const fs::path& staging, const std::atomic<bool>& cancel,
               std::atomic<uint64_t>& bytes_done, const std::function<void()>& after_tensor) {
  const std::unique_ptr<TensorSink> sink = ctx.make_sink(staging / plan.output_name, plan.outputs);
  TensorSink& writer = *sink;
  std::vector<uint16_t> deq;
  std::vector<std::vector<uint8_t>> outs;  // one buffer per output tensor, reused across items
  uint64_t reported = 0;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) throw Cancelled("[model_free] cancelled");
    const WorkItem& item = plan.items[i];
    const WeightInput& in = item.in;
    if (item.bytes) {  // built by the planner (an expanded MX scale): nothing to read
      writer.write(writer.index_of(item.name), item.bytes->data(), item.bytes->size());
      continue;
    }
    if (i + 1 < plan.items.size() && plan.items[i + 1].in.reader) {
      const WeightInput& next = plan.items[i + 1].in;
      next.reader->will_need(*next.tensor, next.byte_offset,
                             next.kind == InputKind::Raw && next.rows == 0 ? next.tensor->nbytes() : next.nbytes());
    }
    uint64_t consumed = 0;
    if (!item.enc) {
      if (in.kind == InputKind::Raw && in.rows == 0) {  // whole tensor, any rank
        writer.write(writer.index_of(item.name), in.reader->data(*in.tensor), in.tensor->nbytes());
        consumed = in.tensor->nbytes();
      } else if (in.kind == InputKind::Raw) {
        const uint64_t n = in.nbytes();
        writer.write(writer.index_of(item.name), in.reader->data(*in.tensor) + in.byte_offset, n);
        consumed = n;
      } else {
        writer.write(writer.index_of(item.name), materialize(ctx, in, deq), in.nbytes());
        consumed = in.tensor->nbytes();
      }
    } else {
      const WeightView w{in.dtype, materialize(ctx, in, deq), in.rows, in.cols};
      if (const int64_t bad = count_nonfinite(in.dtype, w.data, in.rows * in.cols))
        throw CheckpointError(nonfinite_message(in, item.name, bad));
      outs.resize(item.outputs.size());
      std::vector<void*> ptrs(item.outputs.size());
      for (size_t k = 0; k < outs.size(); ++k) {
        outs[k].resize(static_cast<size_t>(item.outputs[k].nbytes()));
        ptrs[k] = outs[k].data();
      }
      if (item.fake)
        item.enc->fake_quantize(w, item.params, ptrs[0]);
      else
        item.enc->quantize(w, item.params, ptrs.data());
      for (size_t k = 0; k < outs.size(); ++k)
        writer.write(writer.index_of(item.name + "." + item.outputs[k].suffix), outs[k].data(), outs[k].size());
      consumed = in.kind == InputKind::Raw ? in.nbytes() : in.tensor->nbytes();
    }
    if (in.kind == InputKind::Raw && in.rows != 0)
      in.reader->release(*in.tensor, in.byte_offset, in.nbytes());
    else
      in.reader->release(*in.tensor);
    bytes_done.fetch_add(consumed, std::memory_order_relaxed);
    reported += consumed;
    if (after_tensor) after_tensor();
  }
  writer.commit();
  // Scales folded into weights have no item of their own.
  if (plan.source_bytes > reported) bytes_done.fetch_add(plan.source_bytes - reported, std::memory_order_relaxed);
}

ojson accounting_json(const ShardPlan& plan) {
  ojson cats = ojson::object();
  for (const char* k : {"quantized", "kept", "dropped"}) cats[k] = ojson{{"tensors", 0}, {"bytes", 0}};
  ojson dropped = ojson::array();
  for (const auto& [name, f] : plan.fates) {
    const char* k = f.fate == Fate::Quantized ? "quantized" : f.fate == Fate::Kept ? "kept" : "dropped";
    cats[k]["tensors"] = cats[k]["tensors"].get<uint64_t>() + 1;
    cats[k]["bytes"] = cats[k]["bytes"].get<uint64_t>() + f.bytes;
    if (f.fate == Fate::Dropped) dropped.push_back(ojson{{"tensor", name}, {"why", f.why}});
  }
  cats["dropped_tensors"] = dropped;
  return cats;
}

}  // namespace fastround
