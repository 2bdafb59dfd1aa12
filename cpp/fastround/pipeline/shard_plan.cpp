#include "fastround/pipeline/shard_plan.h"

#include <algorithm>
#include <set>

#include "fastround/common/error.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/source/dequant.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
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
struct Candidate {
  std::string name;         // output name of the weight (…weight)
  std::string source;       // source tensor it reads
  WeightInput in;
  bool from_fused = false;
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

}  // namespace

uint64_t WeightInput::nbytes() const {
  return static_cast<uint64_t>(rows * cols) * static_cast<uint64_t>(dtype_bits(dtype)) / 8;
}

void plan_shard(const RunContext& ctx, const SafetensorsReader& reader, const DonorLookup& donors, ShardPlan& plan) {
  const std::string& shard = plan.source_name;
  // Source tensors folded into another one's input (scales). Sorted names put a weight before its
  // weight_scale/weight_scale_inv, so a scale is always marked before the loop below reaches it.
  std::set<std::string> consumed;
  std::vector<Candidate> cands;
  std::vector<std::pair<const SafetensorsReader*, const TensorInfo*>> foreign_scales;  // kept beside their router
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

  // FP8 block-scaled sources (weight + weight_scale_inv, possibly in another shard) and MXFP sources
  // (weight/weight_packed + uint8 weight_scale) become bf16 inputs unless they pass through.
  for (auto& c : cands) {
    const TensorInfo* t = c.in.tensor;
    if (c.from_fused || t->shape.size() != 2) continue;
    const bool is_weight = ends_with(c.name, ".weight");
    const bool is_packed = ends_with(c.name, ".weight_packed");
    if (!is_weight && !is_packed) continue;
    const std::string layer = layer_of(c.name);
    if (is_weight && t->dtype == DType::F8_E4M3) {
      const std::string sname = layer + ".weight_scale_inv";
      const SafetensorsReader* sr = &reader;
      const TensorInfo* s = reader.find(sname);
      if (!s) {
        auto it = ctx.tensor_home.find(sname);
        if (it != ctx.tensor_home.end() && it->second != shard) std::tie(sr, s) = donors(sname);
      }
      if (s) {
        if (is_always_skipped(c.name)) {
          // Upstream keeps skip-list layers (routers) in FP8, with their scale even when it was donated.
          if (sr != &reader) foreign_scales.push_back({sr, s});
          continue;
        }
        c.in.kind = InputKind::Fp8Scaled;
        c.in.dtype = DType::BF16;
        c.in.scale_reader = sr;
        c.in.scale = s;
        if (sr == &reader) consumed.insert(sname);
        continue;
      }
    }
    const TensorInfo* ms = reader.find(layer + ".weight_scale");
    if (ms && ms->dtype == DType::U8 && !is_always_skipped(c.name) &&
        ((is_weight && t->dtype == DType::F8_E4M3) || (is_packed && (t->dtype == DType::U8 || t->dtype == DType::I8)))) {
      c.in.kind = InputKind::MxfpSource;
      c.in.source_bits = is_weight ? 8 : 4;
      c.in.cols = is_weight ? t->shape[1] : t->shape[1] * 2;
      c.in.dtype = DType::BF16;
      c.in.scale_reader = &reader;
      c.in.scale = ms;
      c.name = layer + ".weight";
    }
  }

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
    if (consumed.count(c.name)) {
      fate(c.source, Fate::Dropped, t.nbytes(), "FP8 scale folded into the dequantized weight");
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
    if (quantize) {
      const std::string site = site_of(reader, c.name);
      const std::string from = entry ? " (from layer_config['" + entry->key + "'])" : "";
      const SchemeTraits& traits = traits_for(*eff);
      const int bits = *eff->bits;
      if (!traits.supports_bits(bits))
        throw OptionError(site + ": bits=" + std::to_string(bits) + " with data_type '" +
                          eff->data_type.value_or("int") + "'" + from + " is not supported by model-free " +
                          std::string(traits.name));
      if (!dtype_is_float_weight(c.in.dtype))
        throw OptionError(site + " has dtype " + std::string(dtype_name(c.in.dtype)) +
                          "; model-free quantizes F32, F16 and BF16 weights, FP8 weights with a weight_scale_inv, and "
                          "MXFP sources (ignore the layer to keep it as is)");
      const int64_t rows = c.in.rows, cols = c.in.cols;
      if (traits.family == KernelFamily::IntGptq) {
        const bool sym = eff->sym.value_or(true);
        item.int_params = IntQuantParams{bits, eff->group_size.value_or(128), sym,
                                         sym ? traits.zero_offset_sym : traits.zero_offset_asym};
        const int64_t g = item.int_params.group_size;
        if (g == 0 || g < -1)
          throw OptionError(site + ": group_size must be -1 or positive, got " + std::to_string(g) + from);
        const bool partial = g == -1 ? cols % (32 / bits) != 0 : cols % g != 0;
        if (partial && !ctx.job.pad_partial_groups) {
          // A padded qweight loads in neither upstream's loader nor vLLM; keep the weight (docs/compatibility.md).
          ctx.log(LogLevel::Warning, "[model_free] " + c.name + ": in_features " + std::to_string(cols) +
                                         " is not a multiple of group_size " + std::to_string(g) +
                                         "; keeping it in full precision (pad_partial_groups=True pads like upstream)");
          quantize = false;
          keep_why = "in_features not a multiple of group_size";
        } else {
          try {
            item.int_layout = int_gptq_layout(rows, cols, item.int_params, c.name.c_str());
            item.kernel = Kernel::IntGptq;
          } catch (const OptionError& e) {
            ctx.log(LogLevel::Warning, std::string(e.what()) + "; keeping the original weight");
            quantize = false;
            keep_why = "shape the kernel cannot pack";
          }
        }
      } else {
        const int64_t group = traits.family == KernelFamily::Mxfp ? 32 : 16;
        if (cols % group != 0) {
          // Upstream's kernel raises here and keeps the weight; so do we, loudly.
          ctx.log(LogLevel::Warning, "[model_free] " + c.name + ": in_features " + std::to_string(cols) +
                                         " is not a multiple of " + std::to_string(group) +
                                         "; keeping the original weight");
          quantize = false;
          keep_why = "in_features not a multiple of the FP group";
        } else {
          item.fp_bits = bits;
          item.kernel = traits.family == KernelFamily::Mxfp ? Kernel::Mxfp
                        : ctx.fake_format                   ? Kernel::Nvfp4Fake
                                                            : Kernel::Nvfp4;
        }
      }
    }
    // An MXFP source whose target is the same MXFP format passes through byte for byte.
    if (quantize && c.in.kind == InputKind::MxfpSource && item.kernel == Kernel::Mxfp && item.fp_bits == c.in.source_bits) {
      const TensorInfo& w = *c.in.tensor;
      const TensorInfo& s = *c.in.scale;
      for (const TensorInfo* p : {&w, &s}) {
        WorkItem copy;
        copy.kernel = Kernel::Copy;
        copy.name = p->name;
        copy.in.reader = &reader;
        copy.in.tensor = p;
        copy.in.dtype = p->dtype;
        emit(p->name, p->dtype, p->shape);
        plan.items.push_back(std::move(copy));
        fate(p->name, Fate::Quantized, p->nbytes(), "");
      }
      consumed.insert(s.name);
      plan.quantized.push_back(layer);
      continue;
    }
    if (c.in.kind == InputKind::MxfpSource) consumed.insert(c.in.scale->name);
    if (quantize) {
      item.name = layer;
      switch (item.kernel) {
        case Kernel::IntGptq: {
          const auto& L = item.int_layout;
          emit(layer + ".qweight", DType::I32, {L.cols_p / L.pack_factor, L.rows});
          emit(layer + ".qzeros", DType::I32, {L.groups, L.rows_p / L.pack_factor});
          emit(layer + ".scales", DType::F16, {L.groups, L.rows});
          break;
        }
        case Kernel::Mxfp:
          if (item.fp_bits == 4)
            emit(layer + ".weight_packed", DType::U8, {c.in.rows, c.in.cols / 2});
          else
            emit(layer + ".weight", DType::F8_E4M3, {c.in.rows, c.in.cols});
          emit(layer + ".weight_scale", DType::U8, {c.in.rows, c.in.cols / 32});
          break;
        case Kernel::Nvfp4:
          emit(layer + ".weight_packed", DType::U8, {c.in.rows, c.in.cols / 2});
          emit(layer + ".weight_scale", DType::U8, {c.in.rows, c.in.cols / 16});
          break;
        case Kernel::Nvfp4Fake:
          emit(layer + ".weight", c.in.dtype, {c.in.rows, c.in.cols});
          break;
        case Kernel::Copy: break;
      }
      plan.quantized.push_back(layer);
      fate(c.source, Fate::Quantized, t.nbytes(), "");
      if (c.in.scale && c.in.scale_reader == &reader) fate(c.in.scale->name, Fate::Dropped, c.in.scale->nbytes(),
                                                          "scale folded into the dequantized weight");
    } else {
      item.kernel = Kernel::Copy;
      item.name = c.name;
      if (c.in.kind == InputKind::Raw && !c.from_fused) {
        emit(c.name, t.dtype, t.shape);
      } else {
        emit(c.name, c.in.dtype, {c.in.rows, c.in.cols});
        if (c.in.scale && c.in.scale_reader == &reader)
          fate(c.in.scale->name, Fate::Dropped, c.in.scale->nbytes(), "scale folded into the dequantized weight");
      }
      if (is_weight && dims >= 2 && ignored_seen.insert(layer).second) plan.ignored.push_back(layer);
      std::string why = keep_why;
      if (c.from_fused) why = "split per expert" + (why.empty() ? "" : ", " + why);
      if (c.in.kind == InputKind::Fp8Scaled) why = "FP8 dequantized to bf16" + (why.empty() ? "" : ", " + why);
      if (c.in.kind == InputKind::MxfpSource) why = "MXFP dequantized to bf16" + (why.empty() ? "" : ", " + why);
      if (c.in.reader == &reader) fate(c.source, Fate::Kept, t.nbytes(), why);  // a donated tensor counts in its own shard
    }
    plan.items.push_back(std::move(item));
  }
}

namespace {

// The input a kernel reads: the mapped bytes themselves, or a bf16 buffer dequantized from an FP8/MXFP source.
const void* materialize(const RunContext& ctx, const WeightInput& in, std::vector<uint16_t>& buf) {
  const uint8_t* raw = in.reader->data(*in.tensor) + in.byte_offset;
  if (in.kind == InputKind::Raw) return raw;
  buf.resize(static_cast<size_t>(in.rows * in.cols));
  const TensorInfo& s = *in.scale;
  if (in.kind == InputKind::Fp8Scaled) {
    Fp8ScaleView view;
    view.dtype = s.dtype;
    view.data = in.scale_reader->data(s);
    view.numel = s.numel();
    view.rows = s.shape.size() == 2 ? s.shape[0] : 0;
    view.cols = s.shape.size() == 2 ? s.shape[1] : 0;
    if (ctx.fp8_block) std::tie(view.block_rows, view.block_cols) = *ctx.fp8_block;
    view.e8m0 = ctx.scale_e8m0;
    dequant_fp8_scaled(raw, in.rows, in.cols, view, in.tensor->name, buf.data());
  } else {
    dequant_mxfp_source(in.source_bits, raw, in.scale_reader->data(s), in.rows, in.cols, buf.data());
  }
  return buf.data();
}

}  // namespace

void run_shard(const RunContext& ctx, const ShardPlan& plan, const fs::path& staging, const std::atomic<bool>& cancel,
               std::atomic<uint64_t>& bytes_done, const std::function<void()>& after_tensor) {
  SafetensorsWriter writer(staging / plan.output_name, plan.outputs);
  std::vector<uint16_t> deq;
  std::vector<uint8_t> out_a, out_b;
  uint64_t reported = 0;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) throw Cancelled("[model_free] cancelled");
    const WorkItem& item = plan.items[i];
    const WeightInput& in = item.in;
    if (i + 1 < plan.items.size()) {
      const WeightInput& next = plan.items[i + 1].in;
      next.reader->will_need(*next.tensor, next.byte_offset,
                             next.kind == InputKind::Raw && next.rows == 0 ? next.tensor->nbytes() : next.nbytes());
    }
    uint64_t consumed = 0;
    if (item.kernel == Kernel::Copy) {
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
      const void* w = materialize(ctx, in, deq);
      const int64_t rows = in.rows, cols = in.cols;
      switch (item.kernel) {
        case Kernel::IntGptq: {
          const IntGptqLayout& L = item.int_layout;
          std::vector<int32_t> qweight(static_cast<size_t>(L.qweight_elems()));
          std::vector<int32_t> qzeros(static_cast<size_t>(L.qzeros_elems()));
          std::vector<uint16_t> scales(static_cast<size_t>(L.scales_elems()));
          quantize_int_gptq(in.dtype, w, L, item.int_params, qweight.data(), qzeros.data(), scales.data());
          writer.write(writer.index_of(item.name + ".qweight"), qweight.data(), qweight.size() * 4);
          writer.write(writer.index_of(item.name + ".qzeros"), qzeros.data(), qzeros.size() * 4);
          writer.write(writer.index_of(item.name + ".scales"), scales.data(), scales.size() * 2);
          break;
        }
        case Kernel::Mxfp: {
          const MxfpLayout L = mxfp_layout(rows, cols, item.fp_bits);
          out_a.resize(static_cast<size_t>(L.weight_bytes()));
          out_b.resize(static_cast<size_t>(L.scale_bytes()));
          quantize_mxfp(in.dtype, w, L, ctx.opt_rtn, out_a.data(), out_b.data());
          writer.write(writer.index_of(item.name + (item.fp_bits == 4 ? ".weight_packed" : ".weight")), out_a.data(),
                       out_a.size());
          writer.write(writer.index_of(item.name + ".weight_scale"), out_b.data(), out_b.size());
          break;
        }
        case Kernel::Nvfp4: {
          out_a.resize(static_cast<size_t>(rows * cols / 2));
          out_b.resize(static_cast<size_t>(rows * cols / 16));
          quantize_nvfp4_e5m3(in.dtype, w, rows, cols, ctx.opt_rtn, out_a.data(), out_b.data());
          writer.write(writer.index_of(item.name + ".weight_packed"), out_a.data(), out_a.size());
          writer.write(writer.index_of(item.name + ".weight_scale"), out_b.data(), out_b.size());
          break;
        }
        case Kernel::Nvfp4Fake: {
          out_a.resize(static_cast<size_t>(in.nbytes()));
          fake_quantize_nvfp4_e5m3(in.dtype, w, rows, cols, ctx.opt_rtn, out_a.data());
          writer.write(writer.index_of(item.name + ".weight"), out_a.data(), out_a.size());
          break;
        }
        case Kernel::Copy: break;
      }
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
