#include "fastround/pipeline/shard_plan.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <set>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/strings.h"
#include "fastround/common/nonfinite.h"

namespace fastround {

namespace fs = std::filesystem;

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

  const ClassifyContext cc{ctx.source, ctx.tensor_home, [&](const std::string& m) { ctx.log(LogLevel::Warning, m); }};
  classify_quantized_sources(cc, reader, donors, shard, cands, consumed, foreign_scales);

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
    if (quantize && to_lower(eff->data_type.value_or("")).find("nv_fp") != std::string::npos) {
      const std::string from = entry ? " (from layer_config['" + entry->key + "'])" : "";
      const std::string site = site_of(reader, c.name) + ": data_type '" + *eff->data_type + "'" + from;
      if (c.in.kind != InputKind::Nvfp4Source || eff->bits.value_or(16) != 4)
        throw OptionError(site + " with bits=" + std::to_string(eff->bits.value_or(16)) +
                          ": model-free writes NVFP4 only by passing a 4-bit NVFP4 source layer through, and this "
                          "weight is " + (source_format_name(c.in.kind) ? source_format_name(c.in.kind) : "not quantized") +
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
      if (const char* from = source_format_name(c.in.kind))
        why = std::string(from) + " dequantized to bf16" + (why.empty() ? "" : ", " + why);
      if (c.in.reader == &reader) fate(c.source, Fate::Kept, t.nbytes(), why);  // a donated tensor counts in its own shard
    }
    plan.items.push_back(std::move(item));
  }
}

namespace {

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
        writer.write(writer.index_of(item.name), materialize(ctx.source, in, deq), in.nbytes());
        consumed = in.tensor->nbytes();
      }
    } else {
      const WeightView w{in.dtype, materialize(ctx.source, in, deq), in.rows, in.cols};
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
