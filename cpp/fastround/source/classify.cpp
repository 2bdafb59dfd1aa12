#include "fastround/source/classify.h"

#include <algorithm>
#include <cstring>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/strings.h"
#include "fastround/match/patterns.h"

namespace fastround {

namespace {

std::string last_part(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
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
void as_int4(const ClassifyContext& ctx, const SafetensorsReader& reader, Candidate& c, const std::string& layer,
             const TensorInfo& scale, Folded& folded) {
  const TensorInfo& w = *c.in.tensor;
  const std::string site = site_of(reader, w.name);
  const int64_t rows = w.shape[0], cols = w.shape[1] * (w.dtype == DType::I32 ? 8 : 2);
  const int64_t groups = scale.shape[1];
  std::optional<int64_t> inferred;
  if (groups > 0 && cols % groups == 0) inferred = cols / groups;
  const std::optional<int64_t> group = inferred ? inferred : ctx.fmt.int4_group;
  if (!group || *group <= 0)
    throw CheckpointError(site + ": cannot tell the INT4 group size from packed " + shape_str(w.shape) + " and scale " +
                          shape_str(scale.shape) + ", and the config names none");
  if (cols % *group != 0)
    throw CheckpointError(site + ": in_features " + std::to_string(cols) + " is not a multiple of group_size " +
                          std::to_string(*group));
  if (inferred && ctx.fmt.int4_group && *inferred != *ctx.fmt.int4_group)
    ctx.warn(site + ": INT4 group_size " + std::to_string(*inferred) + " from the shapes, " +
                                   std::to_string(*ctx.fmt.int4_group) + " in the config; using the shapes'");
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
bool as_modelopt_nvfp4(const ClassifyContext& ctx, const SafetensorsReader& reader, const std::string& shard, Candidate& c,
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

}  // namespace

std::string layer_of(const std::string& tensor_name) {
  const size_t dot = tensor_name.rfind('.');
  return dot == std::string::npos ? tensor_name : tensor_name.substr(0, dot);
}

std::string site_of(const SafetensorsReader& r, const std::string& tensor) {
  return "[model_free] " + r.path().string() + ": tensor '" + tensor + "'";
}

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

void classify_quantized_sources(const ClassifyContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors,
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
    if (is_weight && (dt == DType::F8_E4M3 || (ctx.fmt.deepseek_v32_scales && is_byte_dtype(dt)))) {
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
    if (ctx.fmt.deepseek_mx_source && is_weight && (dt == DType::F8_E4M3 || is_byte_dtype(dt))) {
      const SafetensorsReader* sr = &reader;
      const TensorInfo* s = find(".scale");
      if (!s && ctx.fmt.deepseek_v32_scales) s = find(".weight_scale");
      if (!s && ctx.fmt.deepseek_v32_scales && inv) std::tie(sr, s) = std::make_pair(inv_reader, inv);
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
      if (ctx.fmt.int4_source && is_packed && is_float_dtype(ws->dtype) && ws->shape.size() == 2) {
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
      check_fp8_scale(t->shape[0], t->shape[1], fp8_scale_view(ctx.fmt, *inv_reader, *inv), site);
      c.in.kind = InputKind::Fp8Scaled;
      c.in.dtype = DType::BF16;
      c.in.scale_reader = inv_reader;
      c.in.scale = inv;
      if (inv_reader == &reader) folded[inv->name] = "FP8 scale folded into the dequantized weight";
    }
  }
}


}  // namespace fastround
