#include "fastround/pipeline/quant_config.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "fastround/common/strings.h"

namespace fastround {

namespace {

// Prefix before the first purely numeric dotted component at index > 0 ("model.layers.3.mlp" -> "model.layers").
std::optional<std::string> block_name_of(const std::string& layer) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t dot = layer.find('.', start);
    parts.push_back(layer.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (!p.empty() && std::all_of(p.begin(), p.end(), [](unsigned char c) { return std::isdigit(c); })) {
      std::string prefix = parts[0];
      for (size_t k = 1; k < i; ++k) prefix += "." + parts[k];
      return prefix;
    }
  }
  return std::nullopt;
}

bool differs(const std::optional<int>& a, const std::optional<int>& b) { return a && a != b; }

// With a full-precision default, the config reads "INT with full-precision exceptions": its top-level
// fields are the most common (bits, group_size, sym, data_type) among quantized layers, first seen on ties.
SchemeFields config_default_scheme(const RunContext& ctx, const std::vector<std::string>& quantized) {
  if (ctx.default_scheme.bits.value_or(16) < 16) return ctx.default_scheme;
  std::vector<std::pair<SchemeFields, int>> counts;
  for (const auto& layer : quantized) {
    const auto eff = resolve_layer_scheme(ctx.default_scheme, ctx.layer_config.match(layer));
    if (!eff || eff->bits.value_or(16) >= 16) continue;
    SchemeFields key;
    key.bits = eff->bits;
    key.group_size = eff->group_size ? eff->group_size : ctx.default_scheme.group_size;
    key.sym = eff->sym.value_or(true);
    std::string dt = eff->data_type.value_or("int");
    dt = to_lower(dt);
    key.data_type = dt;
    auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == key; });
    if (it == counts.end())
      counts.emplace_back(key, 1);
    else
      ++it->second;
  }
  if (counts.empty()) return ctx.default_scheme;
  auto best = counts.begin();
  for (auto it = counts.begin(); it != counts.end(); ++it)
    if (it->second > best->second) best = it;
  return best->first;
}

ojson build_extra_config(const RunContext& ctx, const SchemeFields& d, const std::vector<std::string>& quantized,
                         const std::vector<std::string>& ignored) {
  ojson extra = ojson::object();
  for (const auto& e : ctx.layer_config.entries()) {
    const SchemeFields& c = e.fields;
    const int bits = c.bits.value_or(d.bits.value_or(16));
    const bool changes = differs(c.bits, d.bits) || (c.group_size && c.group_size != d.group_size) ||
                         (c.sym && c.sym != d.sym);
    if (bits >= 16 || changes) extra[e.key] = c.to_json();
  }
  for (const auto& layer : ignored) {
    if (extra.contains(layer) || layer.find("embed") != std::string::npos || layer.find("conv") != std::string::npos)
      continue;
    extra[layer] = ojson{{"bits", 16}, {"data_type", "float"}};
    if (d.data_type.value_or("") == "nvfp4_v2") {
      extra[layer]["act_bits"] = 16;
      extra[layer]["act_data_type"] = "float";
    }
  }
  for (const auto& layer : quantized) {
    if ((layer == "lm_head" || layer == "head" || layer == "embed_out" || layer == "output") && !extra.contains(layer)) {
      const LayerOverride* exact = nullptr;
      for (const auto& e : ctx.layer_config.entries())
        if (e.key == layer) exact = &e;
      extra[layer] = exact ? exact->fields.to_json() : d.to_json();
    }
  }
  return extra;
}

std::string joined_block_names(const std::vector<std::string>& quantized) {
  std::vector<std::string> blocks;
  for (const auto& layer : quantized) {
    const auto b = block_name_of(layer);
    if (b && std::find(blocks.begin(), blocks.end(), *b) == blocks.end()) blocks.push_back(*b);
  }
  std::string joined;
  for (const auto& b : blocks) joined += (joined.empty() ? "" : ",") + b;
  return joined;
}

std::vector<std::string> dedup(const std::vector<std::string>& v) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const auto& x : v)
    if (seen.insert(x).second) out.push_back(x);
  return out;
}

bool is_mx(const std::optional<std::string>& dt) { return dt && dt->find("mx_fp") != std::string::npos; }

bool layer_config_has(const RunContext& ctx, bool (*pred)(const std::optional<std::string>&)) {
  for (const auto& e : ctx.layer_config.entries())
    if (pred(e.fields.data_type)) return true;
  return false;
}

bool is_nvfp4_v2(const std::optional<std::string>& dt) { return dt && *dt == "nvfp4_v2"; }

// auto-round's MXFP dict: packing "auto_round:llm_compressor", the scheme's act fields, and extra_config
// entries holding only the fields that differ from the top level.
ojson mxfp_autoround_config(const RunContext& ctx, const std::vector<std::string>& quantized,
                            const std::vector<std::string>& ignored) {
  const SchemeFields& d = ctx.default_scheme;
  int bits = d.bits.value_or(4);
  int64_t group = d.group_size.value_or(32);
  if (bits >= 16 && !quantized.empty()) {
    // Full-precision default with MXFP overrides: the most common MXFP width among quantized layers.
    std::vector<std::pair<int, int>> counts;
    for (const auto& layer : quantized) {
      const auto eff = resolve_layer_scheme(d, ctx.layer_config.match(layer));
      if (!eff || eff->bits.value_or(16) >= 16 || !is_mx(eff->data_type)) continue;
      auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == *eff->bits; });
      if (it == counts.end())
        counts.emplace_back(*eff->bits, 1);
      else
        ++it->second;
    }
    if (!counts.empty()) {
      auto best = counts.begin();
      for (auto it = counts.begin(); it != counts.end(); ++it)
        if (it->second > best->second) best = it;
      bits = best->first;
      group = 32;
    }
  }
  if (bits != 4 && bits != 8) bits = 4;
  ojson q;
  q["quant_method"] = "auto-round";
  q["packing_format"] = "auto_round:llm_compressor";
  q["bits"] = bits;
  q["group_size"] = group ? group : 32;
  q["sym"] = true;
  q["data_type"] = "mx_fp";
  q["iters"] = 0;
  q["model_free"] = true;
  q["autoround_version"] = kAutoRoundCompatVersion;
  q["enable_quanted_input"] = false;
  const std::string blocks = joined_block_names(quantized);
  if (!blocks.empty()) q["block_name_to_quantize"] = blocks;
  if (d.act_bits) q["act_bits"] = *d.act_bits;
  if (d.act_data_type) q["act_data_type"] = *d.act_data_type;
  if (d.act_dynamic) q["act_dynamic"] = *d.act_dynamic;
  if (d.act_group_size) q["act_group_size"] = *d.act_group_size;
  if (d.act_sym) q["act_sym"] = *d.act_sym;
  ojson extra = ojson::object();
  for (const auto& e : ctx.layer_config.entries()) {
    ojson diff = ojson::object();
    const ojson fields = e.fields.to_json();  // kept alive: items() refers into it
    for (const auto& [k, v] : fields.items())
      if (!q.contains(k) || q[k] != v) diff[k] = v;
    if (!diff.empty()) extra[e.key] = diff;
  }
  const std::set<std::string> qset(quantized.begin(), quantized.end());
  for (const auto& layer : dedup(ignored)) {
    if (qset.count(layer) || extra.contains(layer) || layer.find("embed") != std::string::npos ||
        layer.find("conv") != std::string::npos)
      continue;
    extra[layer] = ojson{{"bits", 16}, {"data_type", "float"}, {"act_bits", 16}, {"act_data_type", "float"}};
  }
  for (const char* head : {"lm_head", "head", "embed_out", "output"}) {
    if (!qset.count(head) || extra.contains(head)) continue;
    const LayerOverride* exact = nullptr;
    for (const auto& e : ctx.layer_config.entries())
      if (e.key == head) exact = &e;
    extra[head] = exact ? exact->fields.to_json() : d.to_json();
  }
  if (!extra.empty()) q["extra_config"] = extra;
  return q;
}

// llm-compressor misses some routed-expert layouts under "Linear"; upstream appends "RoutedExperts" when a
// layer name looks like one (its test on the second-to-last name part is reproduced as is).
ojson with_routed_experts(ojson targets, const std::vector<std::string>& layers) {
  for (const auto& t : targets)
    if (t == "RoutedExperts") return targets;
  for (const auto& name : layers) {
    std::string l = name;
    l = to_lower(l);
    if (l.find("block_sparse_moe") != std::string::npos || l.find(".moe.") != std::string::npos ||
        l.find(".feed_forward.") != std::string::npos) {
      targets.push_back("RoutedExperts");
      return targets;
    }
    if (l.find(".experts.") == std::string::npos) continue;
    const size_t last = name.rfind('.');
    const size_t prev = last == std::string::npos || last == 0 ? std::string::npos : name.rfind('.', last - 1);
    const std::string proj = last == std::string::npos ? name : name.substr(prev == std::string::npos ? 0 : prev + 1,
                                                                           last - (prev == std::string::npos ? 0 : prev + 1));
    if (proj == "gate_proj" || proj == "up_proj" || proj == "down_proj") continue;
    targets.push_back("RoutedExperts");
    return targets;
  }
  return targets;
}

// compressed-tensors 0.20 quantization args of one config group, in its serialisation order.
ojson ct_group(int bits, const std::string& dt, const ojson& targets, const ojson& format) {
  ojson g;
  g["targets"] = targets;
  if (dt == "nvfp4_v2") {
    g["weights"] = ojson{{"num_bits", 4},          {"type", "float"},  {"symmetric", true}, {"group_size", 16},
                         {"strategy", "tensor_group"}, {"dynamic", false}, {"observer", "minmax"}};
    g["input_activations"] = ojson{{"num_bits", 4},          {"type", "float"},  {"symmetric", true}, {"group_size", 16},
                                   {"strategy", "tensor_group"}, {"dynamic", "local"}, {"observer", "minmax"}};
  } else {
    auto args = [&](bool dynamic) {
      return ojson{{"num_bits", bits}, {"type", "float"}, {"symmetric", true},        {"group_size", 32},
                   {"strategy", "group"}, {"dynamic", dynamic}, {"scale_dtype", "torch.uint8"}};
    };
    g["weights"] = args(false);
    g["input_activations"] = args(true);
  }
  g["output_activations"] = nullptr;
  g["format"] = format;
  return g;
}

std::string ct_format(int bits, const std::string& dt) {
  if (dt == "nvfp4_v2") return "nvfp4-e5m3-pack-quantized";
  return bits == 4 ? "mxfp4-pack-quantized" : "mxfp8-quantized";
}

ojson ct_wrap(ojson groups, const std::string& format, const ojson& ignore) {
  ojson q;
  q["config_groups"] = std::move(groups);
  q["quant_method"] = "compressed-tensors";
  q["kv_cache_scheme"] = nullptr;
  q["format"] = format;
  q["quantization_status"] = "compressed";
  q["global_compression_ratio"] = nullptr;
  q["ignore"] = ignore;
  q["moe_sparsity_config"] = nullptr;
  q["provider"] = "auto-round";
  return q;
}

// auto-round's fixed compressed-tensors dict for NVFP4_E5M3 (no global scales; keys sorted as upstream writes them).
ojson nvfp4_e5m3_ct_config(const ojson& targets, std::vector<std::string> ignore) {
  auto args = [](const ojson& dynamic) {
    return ojson{{"actorder", nullptr}, {"block_structure", nullptr}, {"dynamic", dynamic},
                 {"group_size", 16},    {"num_bits", 4},              {"observer", "minmax"},
                 {"observer_kwargs", ojson::object()}, {"strategy", "tensor_group"}, {"symmetric", true},
                 {"type", "float"}};
  };
  if (ignore.empty()) ignore = {"lm_head"};
  ojson g;
  g["input_activations"] = args("local");
  g["output_activations"] = nullptr;
  g["targets"] = targets;
  g["weights"] = args(false);
  ojson q;
  q["config_groups"] = ojson{{"group_0", g}};
  q["format"] = "nvfp4-e5m3-pack-quantized";
  q["global_compression_ratio"] = nullptr;
  q["ignore"] = dedup(ignore);
  q["kv_cache_scheme"] = nullptr;
  q["quant_method"] = "compressed-tensors";
  q["quantization_status"] = "compressed";
  q["provider"] = "auto-round";
  return q;
}

// Format llm_compressor for MXFP (and MXFP mixed with NVFP4_E5M3 overrides): one group per (bits, data_type),
// overrides first by bits descending, the default group last with target "Linear".
ojson mxfp_ct_config(const RunContext& ctx, const std::vector<std::string>& quantized,
                     const std::vector<std::string>& ignored) {
  const SchemeFields& d = ctx.default_scheme;
  const int bits = d.bits.value_or(4);
  std::string ddt = d.data_type.value_or("mx_fp");
  ddt = to_lower(ddt);
  const bool fp_default = bits >= 16;
  const std::set<std::string> qset(quantized.begin(), quantized.end());
  ojson ignore = ojson::array();
  for (const auto& n : dedup(ignored))
    if (!qset.count(n)) ignore.push_back(n);
  std::vector<std::pair<std::pair<int, std::string>, std::vector<std::string>>> groups;
  auto add = [&](std::pair<int, std::string> key, const std::string& layer) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end())
      groups.push_back({key, {layer}});
    else
      it->second.push_back(layer);
  };
  if (!ctx.layer_config.entries().empty()) {
    for (const auto& layer : quantized) {
      const auto eff = resolve_layer_scheme(d, ctx.layer_config.match(layer));
      std::string dt = eff ? eff->data_type.value_or(ddt) : ddt;
      dt = to_lower(dt);
      add({eff ? eff->bits.value_or(bits) : bits, dt}, layer);
    }
  } else if (!fp_default) {
    for (const auto& layer : quantized) add({bits, ddt}, layer);
  }
  if (groups.size() <= 1) {
    const auto key = groups.empty() ? std::make_pair(bits, ddt) : groups.front().first;
    const bool targeted = fp_default && !groups.empty();
    const ojson targets = targeted ? with_routed_experts(ojson(quantized), quantized) : ojson::array({"Linear"});
    if (key.second == "nvfp4_v2") {
      std::vector<std::string> ig;
      for (const auto& n : ignore) ig.push_back(n.get<std::string>());
      return nvfp4_e5m3_ct_config(targets, ig);
    }
    return ct_wrap(ojson{{"group_0", ct_group(key.first, key.second, targets, nullptr)}}, ct_format(key.first, key.second),
                   ignore);
  }
  const auto default_key = std::make_pair(bits, ddt);
  std::vector<size_t> order;
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i].first != default_key) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return groups[a].first.first > groups[b].first.first; });
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i].first == default_key) order.push_back(i);
  ojson cg = ojson::object();
  for (size_t k = 0; k < order.size(); ++k) {
    const auto& [key, layers] = groups[order[k]];
    const ojson targets = with_routed_experts(key == default_key ? ojson::array({"Linear"}) : ojson(layers), layers);
    cg["group_" + std::to_string(k)] = ct_group(key.first, key.second, targets, ct_format(key.first, key.second));
  }
  return ct_wrap(cg, "mixed-precision", ignore);
}

}  // namespace

ojson build_quantization_config(const RunContext& ctx, const std::vector<std::string>& quantized,
                                const std::vector<std::string>& ignored) {
  const SchemeFields& def = ctx.default_scheme;
  const bool fp_default = def.bits.value_or(16) >= 16 && !is_mx(def.data_type);
  if (is_nvfp4_v2(def.data_type) && ctx.llm_compressor) return nvfp4_e5m3_ct_config(ojson::array({"Linear"}), ignored);
  if (fp_default && ctx.llm_compressor && layer_config_has(ctx, is_nvfp4_v2))
    return nvfp4_e5m3_ct_config(quantized.empty() ? ojson::array({"Linear"}) : with_routed_experts(ojson(dedup(quantized)), quantized),
                                {});
  if (is_mx(def.data_type) || (fp_default && layer_config_has(ctx, is_mx)))
    return ctx.llm_compressor ? mxfp_ct_config(ctx, quantized, ignored) : mxfp_autoround_config(ctx, quantized, ignored);
  const SchemeFields d = config_default_scheme(ctx, quantized);
  ojson q;
  q["quant_method"] = "auto-round";
  q["packing_format"] = std::string(ctx.default_encoding->packing_format(d.sym.value_or(true)));
  q["bits"] = d.bits.value_or(16);
  q["group_size"] = d.group_size.value_or(128);
  q["sym"] = d.sym.value_or(true);
  q["data_type"] = d.data_type.value_or("int");
  q["iters"] = 0;
  q["model_free"] = true;
  q["autoround_version"] = kAutoRoundCompatVersion;
  if (is_nvfp4_v2(d.data_type)) {
    if (d.act_bits) q["act_bits"] = *d.act_bits;
    if (d.act_data_type) q["act_data_type"] = *d.act_data_type;
    if (d.act_group_size) q["act_group_size"] = *d.act_group_size;
    if (d.act_sym) q["act_sym"] = *d.act_sym;
    if (d.act_dynamic) q["act_dynamic"] = *d.act_dynamic;
    q["packing_format"] = ctx.fake_format ? "auto_round:fake" : std::string(encoding(Encoding::Nvfp4E5M3).packing_format(true));
  }
  const std::string blocks = joined_block_names(quantized);
  if (!blocks.empty()) q["block_name_to_quantize"] = blocks;
  ojson extra = build_extra_config(ctx, d, quantized, ignored);
  if (!extra.empty()) q["extra_config"] = extra;
  return q;
}

}  // namespace fastround
