#include "fastround/pipeline/model_free.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <set>
#include <thread>

#include "fastround/common/error.h"
#include "fastround/common/strings.h"
#include "fastround/common/parallel.h"
#include "fastround/io/files.h"
#include "fastround/io/safetensors.h"
#include "fastround/match/patterns.h"
#include "fastround/pipeline/quant_config.h"
#include "fastround/pipeline/publish.h"
#include "fastround/pipeline/resume.h"
#include "fastround/pipeline/schedule.h"
#include "fastround/pipeline/shard_plan.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStagingDir = ".fastround-partial";
constexpr const char* kDownloadDir = "source-shards";  // inside the staging folder
constexpr const char* kSummaryFile = "fastround_summary.json";

// ---- source discovery -------------------------------------------------------------------------

}  // namespace

std::optional<fs::path> find_weight_index(const fs::path& src) {
  std::vector<fs::path> index_files;
  for (const auto& e : fs::directory_iterator(src))
    if (e.is_regular_file() && ends_with(e.path().filename().string(), ".safetensors.index.json"))
      index_files.push_back(e.path());
  if (index_files.empty()) return std::nullopt;
  if (fs::exists(src / "model.safetensors.index.json")) return src / "model.safetensors.index.json";
  std::sort(index_files.begin(), index_files.end());
  return index_files.front();
}

std::vector<std::string> indexed_shards(const fs::path& src) {
  std::vector<std::string> shards;
  if (const auto index = find_weight_index(src)) {
    const ojson j = read_json_file(*index);
    if (j.contains("weight_map") && j["weight_map"].is_object())
      for (const auto& [tensor, file] : j["weight_map"].items())
        if (file.is_string() && std::find(shards.begin(), shards.end(), file.get<std::string>()) == shards.end())
          shards.push_back(file.get<std::string>());
  }
  return shards;
}

namespace {

// `remote`: shard files of a streamed hub repo, fetched on demand (empty for a local folder).
// `homes` receives tensor -> shard from the index (empty without one).
std::vector<std::string> discover_shards(const fs::path& src, const std::vector<std::string>& remote,
                                         std::map<std::string, std::string>* homes) {
  std::vector<fs::path> weight_files, bin_files;
  for (const auto& e : fs::directory_iterator(src)) {
    if (!e.is_regular_file()) continue;
    const std::string n = e.path().filename().string();
    if (ends_with(n, ".safetensors")) weight_files.push_back(e.path());
    if (ends_with(n, ".bin")) bin_files.push_back(e.path());
  }
  std::sort(weight_files.begin(), weight_files.end());
  std::vector<std::string> shards;
  if (const auto index = find_weight_index(src)) {
    const ojson j = read_json_file(*index);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw CheckpointError("[model_free] index '" + index->string() + "' has no weight_map object");
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string())
        throw CheckpointError("[model_free] index '" + index->string() + "': tensor '" + tensor +
                              "' maps to a non-string " + file.dump());
      const std::string f = file.get<std::string>();
      if (f.empty() || fs::path(f).is_absolute() || f.find("..") != std::string::npos || f.find('/') != std::string::npos)
        throw CheckpointError("[model_free] index '" + index->string() + "': tensor '" + tensor + "' maps to '" + f +
                              "', which is not a file name inside '" + src.string() + "'");
      if (std::find(shards.begin(), shards.end(), f) == shards.end()) shards.push_back(f);
      if (homes) (*homes)[tensor] = f;
    }
    for (const auto& f : shards)
      if (!fs::is_regular_file(src / f) && std::find(remote.begin(), remote.end(), f) == remote.end())
        throw MissingPathError("[model_free] shard '" + f + "' listed in '" + index->filename().string() +
                               "' is missing from '" + src.string() + "'");
    return shards;
  }
  for (const auto& w : weight_files) shards.push_back(w.filename().string());
  for (const auto& r : remote)
    if (ends_with(r, ".safetensors") && std::find(shards.begin(), shards.end(), r) == shards.end()) shards.push_back(r);
  std::sort(shards.begin(), shards.end());
  if (shards.empty()) {
    if (!bin_files.empty())
      throw OptionError("[model_free] '" + src.string() +
                        "' holds only PyTorch .bin weights; fastround model-free reads *.safetensors shards "
                        "(convert them with transformers' save_pretrained(safe_serialization=True))");
    throw MissingPathError("[model_free] no *.safetensors weight files in '" + src.string() + "'");
  }
  return shards;
}

// Upstream's format gate, from the encoding table: auto_round and auto_round:auto_gptq always, plus what each
// encoding of the run accepts. A full-precision default takes the encodings of its layer_config overrides.
void check_model_free_format(const std::string& fmt, const SchemeFields& scheme, const LayerConfig& lc,
                             const std::string& given) {
  std::vector<const EncodingTraits*> used = {&encoding(Encoding::IntGptq), encoding_for(scheme)};
  if (scheme.bits.value_or(16) >= 16)
    for (const auto& e : lc.entries()) {
      try {
        used.push_back(encoding_for(scheme.merged(e.fields)));
      } catch (const OptionError&) {
        // An override no encoding serves fails later, naming its layer.
      }
    }
  std::vector<std::string_view> ok;
  for (const EncodingTraits* enc : used) {
    if (!enc) continue;
    if (enc->accepts_model_free_format(fmt)) return;
    for (auto f : enc->model_free_formats)
      if (std::find(ok.begin(), ok.end(), f) == ok.end()) ok.push_back(f);
  }
  std::string list;
  for (const auto& f : ok) list += (list.empty() ? "'" : ", '") + std::string(f) + "'";
  const EncodingTraits* def = encoding_for(scheme);
  throw OptionError("[model_free] format '" + given + "' is not supported for model-free " +
                    std::string(def ? def->name : "full_precision") + " output; use one of " + list);
}

// What makes partial output reusable: options that change bytes, the config, and each source shard.
Fingerprint make_fingerprint(const ModelFreeJob& job, const fs::path& src, const std::vector<std::string>& shards) {
  ojson options = job.to_json();
  for (const char* k : {"source_dir", "output_dir", "threads", "shard_parallelism", "remote_shards", "source_revision"})
    options.erase(k);
  Fingerprint fp;
  fp.add_json("options", options);
  fp.add("fastround", std::string(kAutoRoundCompatVersion) + "/resume-1");
  std::ifstream cfg(src / "config.json", std::ios::binary);
  fp.add("config.json", std::string(std::istreambuf_iterator<char>(cfg), {}));
  for (const auto& s : shards) {
    if (fs::is_regular_file(src / s))
      fp.add_file_stat("shard " + s, src / s);
    else
      fp.add("shard " + s, job.source_revision);  // streamed: the hub revision names the bytes
  }
  return fp;
}

struct ShardJob {
  std::string source_name, output_name;
  std::unique_ptr<ShardPlan> plan;  // planned up front for local shards
  std::shared_ptr<SafetensorsReader> reader;
  ShardRecord record;
  bool done = false;
};

ShardRecord record_of(const ShardPlan& plan, uint64_t file_bytes) {
  ShardRecord r;
  r.source_name = plan.source_name;
  r.output_name = plan.output_name;
  r.output_bytes = file_bytes;
  for (const auto& t : plan.outputs) r.tensor_names.push_back(t.name);
  r.quantized = plan.quantized;
  r.ignored = plan.ignored;
  r.accounting = accounting_json(plan);
  return r;
}

void add_accounting(ojson& total, const ojson& shard) {
  for (const char* k : {"quantized", "kept", "dropped"}) {
    if (!total.contains(k)) total[k] = ojson{{"tensors", 0}, {"bytes", 0}};
    total[k]["tensors"] = total[k]["tensors"].get<uint64_t>() + shard[k]["tensors"].get<uint64_t>();
    total[k]["bytes"] = total[k]["bytes"].get<uint64_t>() + shard[k]["bytes"].get<uint64_t>();
  }
  if (!total.contains("dropped_tensors")) total["dropped_tensors"] = ojson::array();
  for (const auto& d : shard["dropped_tensors"]) total["dropped_tensors"].push_back(d);
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  const double v = static_cast<double>(b);
  if (v >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f GB", v / 1e9);
  else if (v >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2f MB", v / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

}  // namespace

// ---- job ----------------------------------------------------------------------------------------

std::vector<std::string> diffusion_components(const fs::path& src) {
  if (fs::exists(src / "config.json") || !fs::is_regular_file(src / "transformer" / "config.json")) return {};
  std::vector<std::string> more;
  for (const auto& e : fs::directory_iterator(src)) {
    const std::string name = e.path().filename().string();
    if (name != "transformer" && name.rfind("transformer", 0) == 0 && fs::is_regular_file(e.path() / "config.json"))
      more.push_back(name);
  }
  std::sort(more.begin(), more.end());
  more.insert(more.begin(), "transformer");
  return more;
}

namespace {

// A diffusers pipeline as upstream handles it: each transformer component is quantized as a checkpoint of
// its own into <out>/<component>, every other root entry is copied unless the output already has it. All
// of it is staged and renamed into place at the end, model_index.json last, so a pipeline folder with a
// model_index.json is complete.
ModelFreeResult run_diffusion_pipeline(const ModelFreeJob& job, const std::vector<std::string>& components,
                                       const ModelFreeCallbacks& callbacks) {
  Logger log{&callbacks};
  const fs::path src = job.source_dir;
  const fs::path out = job.output_dir;
  check_output_location(src, out);
  if (!job.remote_shards.empty())
    throw OptionError("[model_free] '" + src.string() + "' is a diffusers pipeline; streaming its shards is not "
                      "supported, download it whole (stream=False)");
  log(LogLevel::Info, "[model_free] Detected diffusion model (no root config.json, found transformer/ subfolder). "
                      "All transformer components will be quantized; other sub-components are copied.");
  const bool created_out = !fs::exists(out);
  const fs::path staging = out / kStagingDir;
  ModelFreeResult total;
  total.output_dir = out;
  total.summary = ojson::object();
  try {
    fs::create_directories(staging);
    for (const auto& name : components) {
      log(LogLevel::Info, "[model_free] Model-free quantization of " + name);
      ModelFreeJob part = job;
      part.source_dir = src / name;
      part.output_dir = staging / name;
      ModelFreeResult r = run_model_free(part, callbacks);
      total.quantized_layers.insert(total.quantized_layers.end(), r.quantized_layers.begin(), r.quantized_layers.end());
      total.ignored_layers.insert(total.ignored_layers.end(), r.ignored_layers.begin(), r.ignored_layers.end());
      for (const auto& f : r.shard_files) total.shard_files.push_back(name + "/" + f);
      total.source_bytes += r.source_bytes;
      total.output_bytes += r.output_bytes;
      if (name == "transformer") total.quantization_config = r.quantization_config;
      total.summary[name] = r.summary;
    }
    std::vector<fs::path> copies;
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string name = e.path().filename().string();
      if (is_stale_metadata(name) || name == "model_index.json" || fs::exists(out / name)) continue;
      if (std::find(components.begin(), components.end(), name) != components.end()) continue;
      copy_tree(e.path(), staging / name);
      copies.push_back(name);
    }
    if (fs::is_regular_file(src / "model_index.json")) copy_tree(src / "model_index.json", staging / "model_index.json");
    for (const auto& name : components) {
      std::error_code ec;
      fs::remove_all(out / name, ec);  // an earlier output of this component
      fs::rename(staging / name, out / name);
    }
    for (const auto& name : copies) fs::rename(staging / name, out / name);
    if (fs::exists(staging / "model_index.json")) fs::rename(staging / "model_index.json", out / "model_index.json");
    fs::remove(staging);
  } catch (...) {
    // Components keep their own resume state under the staging folder; without any, nothing is left.
    std::error_code ec;
    bool resumable = false;
    for (const auto& name : components)
      resumable = resumable || fs::exists(staging / name / kStagingDir / kResumeManifestName, ec);
    if (!resumable) {
      fs::remove_all(staging, ec);
      if (created_out && fs::is_empty(out, ec)) fs::remove(out, ec);
    }
    throw;
  }
  return total;
}

}  // namespace

ModelFreeResult run_model_free(const ModelFreeJob& job, const ModelFreeCallbacks& callbacks) {
  Logger log{&callbacks};
  const auto started = std::chrono::steady_clock::now();
  const fs::path src = job.source_dir;
  const fs::path out = job.output_dir;
  if (!fs::exists(src)) throw MissingPathError("[model_free] model path '" + src.string() + "' does not exist");
  if (!fs::is_directory(src)) throw OptionError("[model_free] model path '" + src.string() + "' is not a folder");
  if (!fs::is_regular_file(src / "config.json")) {
    const std::vector<std::string> components = diffusion_components(src);
    if (!components.empty()) return run_diffusion_pipeline(job, components, callbacks);
    throw MissingPathError("[model_free] '" + src.string() + "' has no config.json (nor a diffusers transformer/ "
                           "folder with one)");
  }
  check_output_location(src, out);
  const ResolvedScheme scheme = resolve_job_scheme(job);
  const std::string fmt = job.format.substr(0, job.format.find(','));
  if (job.threads > 0) set_num_threads(job.threads);

  const ojson config = read_json_file(src / "config.json");
  if (!config.is_object())
    throw CheckpointError("[model_free] '" + (src / "config.json").string() + "' holds " +
                          std::string(config.type_name()) + ", not a JSON object");
  RunContext ctx{job, scheme.fields, nullptr, LayerConfig::parse(job.layer_config, scheme.name)};
  ctx.log = log;
  check_model_free_format(fmt, scheme.fields, ctx.layer_config, job.format);
  ctx.default_encoding = encoding_for(scheme.fields, fmt);
  if (!ctx.default_encoding) ctx.default_encoding = &encoding(Encoding::IntGptq);
  ctx.format = fmt;
  ctx.fake_format = fmt == "fake";
  ctx.llm_compressor = fmt == "llm_compressor";
  ctx.opt_rtn = !job.disable_opt_rtn.value_or(false);
  ctx.source = read_source_format(config);
  IgnoreOptions io;
  io.ignore_layers = job.ignore_layers;
  io.quant_lm_head = job.quant_lm_head;
  io.quant_nontext_module = job.quant_nontext_module;
  io.detected = job.detected_ignore;
  io.predefined = predefined_ignore_layers(config);
  ctx.ignore = std::make_unique<IgnoreMatcher>(build_ignore_patterns(io, ctx.layer_config));

  std::vector<std::string> order = discover_shards(src, job.remote_shards, &ctx.tensor_home);
  const auto donors = order_for_donors(order, ctx.tensor_home, log);
  const size_t n = order.size();
  std::vector<ShardJob> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    jobs[i].source_name = order[i];
    jobs[i].output_name = n == 1 ? "model.safetensors" : name;
  }

  const bool created_out = !fs::exists(out);
  const fs::path staging = out / kStagingDir;
  ShardStore store(src, staging / kDownloadDir, callbacks);
  // Local shards are read and planned before anything is written: bad input fails with nothing on disk.
  uint64_t total = 0, largest = 0;
  std::map<std::string, std::string> seen;
  auto donor_lookup = [&](const std::string& tensor) -> std::pair<const SafetensorsReader*, const TensorInfo*> {
    const std::string& home = ctx.tensor_home.at(tensor);
    auto r = store.open(home, {});
    return {r.get(), r->find(tensor)};
  };
  auto plan_job = [&](ShardJob& j) {
    j.plan = std::make_unique<ShardPlan>();
    j.plan->source_name = j.source_name;
    j.plan->output_name = j.output_name;
    plan_shard(ctx, *j.reader, donor_lookup, *j.plan);
  };
  const bool local = job.remote_shards.empty();
  if (local) {
    for (auto& j : jobs) {
      j.reader = store.open(j.source_name, {});
      total += j.reader->data_bytes();
      for (const auto& t : j.reader->tensors()) {
        largest = std::max(largest, t.nbytes());
        auto [it, fresh] = seen.emplace(t.name, j.source_name);
        if (!fresh)
          throw CheckpointError("[model_free] tensor '" + t.name + "' appears in both '" + it->second + "' and '" +
                                j.source_name + "'; a checkpoint must hold each tensor once");
      }
    }
  }

  std::set<std::string> written_names;
  auto claim_names = [&](const std::vector<std::string>& names, const std::string& shard) {
    for (const auto& t : names)
      if (!written_names.insert(t).second)
        throw CheckpointError("[model_free] tensor '" + t + "' would be written twice (again by shard '" + shard +
                              "'); refusing to write a checkpoint with duplicate names");
  };
  if (local) {
    for (auto& j : jobs) {
      plan_job(j);
      std::vector<std::string> names;
      for (const auto& t : j.plan->outputs) names.push_back(t.name);
      claim_names(names, j.source_name);
    }
  }

  fs::create_directories(out);
  std::string resume_message;
  ResumeManifest manifest(staging, make_fingerprint(job, src, order), resume_message);
  if (!resume_message.empty())
    log(resume_message.rfind("discarding", 0) == 0 ? LogLevel::Warning : LogLevel::Info, "[model_free] " + resume_message);
  for (auto& j : jobs) {
    if (const ShardRecord* r = manifest.record(j.output_name); r && r->source_name == j.source_name) {
      j.done = true;
      j.record = *r;
    }
  }
  for (auto& j : jobs)
    if (j.done) j.plan.reset();  // finished by an earlier run
  log(LogLevel::Info, "[model_free] " + std::to_string(n) + " shard(s)" + (local ? ", " + human_bytes(total) : "") +
                          ", scheme " + scheme.label + " -> " + out.string());

  for (const auto& j : jobs)
    if (!j.done) {
      store.pin(j.source_name);
      auto d = donors.find(j.source_name);
      if (d != donors.end())
        for (const auto& s : d->second) store.pin(s);
    }
  for (auto& j : jobs) j.reader.reset();  // the store keeps what is still needed

  const int parallel = choose_parallelism(job, n, largest, log);
  const int threads_each = std::max(1, (job.threads > 0 ? job.threads : max_threads()) / parallel);
  std::atomic<bool> cancel{false};
  std::atomic<uint64_t> bytes_done{0};
  std::mutex mu;
  std::condition_variable cv;
  size_t next = 0, finished = 0;
  std::exception_ptr failure;
  std::vector<size_t> todo;
  for (size_t i = 0; i < n; ++i)
    if (!jobs[i].done) todo.push_back(i);
    else if (local) bytes_done += fs::file_size(src / jobs[i].source_name);

  ModelFreeProgress p;
  p.shard_count = static_cast<int>(n);
  p.bytes_total = total;
  // One shard at a time runs on the calling thread and reports between tensors, so cancelling from the
  // progress callback is prompt and deterministic; with several in flight the calling thread reports
  // whenever a worker finishes a tensor (or every 100 ms).
  const bool inline_run = parallel == 1 || todo.size() <= 1;
  auto report = [&](size_t k) {
    p.shard_index = static_cast<int>(k + 1);
    p.shard_name = jobs[k].source_name;
    p.bytes_done = bytes_done;
    if (callbacks.progress && !callbacks.progress(p)) throw Cancelled("[model_free] cancelled");
  };
  auto worker = [&]() {
    if (!inline_run) set_num_threads(threads_each);
    while (true) {
      size_t k;
      std::vector<std::string> upcoming;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (next >= todo.size() || cancel) return;
        k = todo[next++];
        for (size_t u = next; u < todo.size() && upcoming.size() < static_cast<size_t>(parallel); ++u)
          upcoming.push_back(jobs[todo[u]].source_name);
      }
      ShardJob& j = jobs[k];
      try {
        if (inline_run) report(k);
        j.reader = store.open(j.source_name, upcoming);
        if (!j.plan) {
          plan_job(j);
          std::vector<std::string> names;
          for (const auto& t : j.plan->outputs) names.push_back(t.name);
          std::lock_guard<std::mutex> lock(mu);
          claim_names(names, j.source_name);
        }
        std::function<void()> after_tensor;
        if (inline_run)
          after_tensor = [&, k] { report(k); };
        else
          after_tensor = [&] { cv.notify_all(); };
        run_shard(ctx, *j.plan, staging, cancel, bytes_done, after_tensor);
        j.record = record_of(*j.plan, fs::file_size(staging / j.output_name));
        manifest.mark_done(j.record);
        log(LogLevel::Info, "[model_free] shard " + std::to_string(k + 1) + "/" + std::to_string(n) + " (" +
                                j.source_name + " -> " + j.output_name + "): " + std::to_string(j.plan->quantized.size()) +
                                " quantized, " + std::to_string(j.plan->ignored.size()) + " kept");
        j.plan.reset();
        j.reader.reset();
        store.unpin(j.source_name);
        auto d = donors.find(j.source_name);
        if (d != donors.end())
          for (const auto& s : d->second) store.unpin(s);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!failure) failure = std::current_exception();
        cancel = true;
        cv.notify_all();
        return;
      }
      std::lock_guard<std::mutex> lock(mu);
      ++finished;
      cv.notify_all();
    }
  };

  ModelFreeResult result;
  result.output_dir = out;
  std::vector<std::thread> pool;
  // A std::thread still joinable when unwinding calls std::terminate: stop and join the workers first.
  struct JoinOnUnwind {
    std::vector<std::thread>& pool;
    std::atomic<bool>& cancel;
    ~JoinOnUnwind() {
      for (auto& t : pool)
        if (t.joinable()) {
          cancel = true;
          t.join();
        }
    }
  } join_on_unwind{pool, cancel};
  try {
    if (inline_run) {
      worker();
    } else {
      for (int w = 0; w < std::min<int>(parallel, static_cast<int>(todo.size())); ++w) pool.emplace_back(worker);
      std::unique_lock<std::mutex> lock(mu);
      while (finished < todo.size() && !failure) {
        cv.wait_for(lock, std::chrono::milliseconds(100));
        if (failure) break;
        const size_t k = todo[std::min(next, todo.size()) - (next > 0 ? 1 : 0)];
        lock.unlock();
        bool go = true;
        try {
          report(k);
        } catch (...) {
          go = false;
          lock.lock();
          if (!failure) failure = std::current_exception();
          cancel = true;
          break;
        }
        lock.lock();
        if (!go) break;
      }
    }
    for (auto& t : pool) t.join();
    if (failure) std::rethrow_exception(failure);
    if (cancel) throw Cancelled("[model_free] cancelled");
    p.shard_index = static_cast<int>(n);
    p.bytes_done = std::max<uint64_t>(bytes_done, total);
    if (callbacks.progress && !callbacks.progress(p)) throw Cancelled("[model_free] cancelled");

    ojson weight_map = ojson::object();
    ojson accounting = ojson::object();
    for (const auto& j : jobs) {
      for (const auto& t : j.record.tensor_names) weight_map[t] = j.output_name;
      result.quantized_layers.insert(result.quantized_layers.end(), j.record.quantized.begin(), j.record.quantized.end());
      result.ignored_layers.insert(result.ignored_layers.end(), j.record.ignored.begin(), j.record.ignored.end());
      result.shard_files.push_back(j.output_name);
      result.output_bytes += j.record.output_bytes;
      add_accounting(accounting, j.record.accounting);
    }
    result.source_bytes = accounting["quantized"]["bytes"].get<uint64_t>() + accounting["kept"]["bytes"].get<uint64_t>() +
                          accounting["dropped"]["bytes"].get<uint64_t>();
    // Upstream's rule: an output whose tensors all sit in one shard is model.safetensors, without an index
    // (a shard left empty, having donated all it held, is still written).
    size_t filled = 0, only = 0;
    for (size_t i = 0; i < n; ++i)
      if (!jobs[i].record.tensor_names.empty()) {
        ++filled;
        only = i;
      }
    const bool single = n > 1 && filled == 1;
    if (single) {
      fs::rename(staging / jobs[only].output_name, staging / "model.safetensors");
      result.shard_files[only] = "model.safetensors";
    }
    if (n > 1 && !single) {
      ojson index;
      index["metadata"] = ojson{{"total_size", 0}};
      index["weight_map"] = weight_map;
      write_text_atomic(staging / "model.safetensors.index.json", python_json_dumps(index));
    }
    result.quantization_config = build_quantization_config(ctx, result.quantized_layers, result.ignored_layers);
    ojson out_config = config;
    drop_quantization_configs(out_config);
    out_config["quantization_config"] = result.quantization_config;
    write_text_atomic(staging / "quantization_config.json", python_json_dumps(result.quantization_config));
    write_text_atomic(staging / "config.json", python_json_dumps(out_config));
    const uint64_t qb = accounting["quantized"]["bytes"].get<uint64_t>();
    accounting["quantized_bytes_fraction"] = result.source_bytes ? static_cast<double>(qb) / result.source_bytes : 0.0;
    accounting["source_bytes"] = result.source_bytes;
    accounting["output_bytes"] = result.output_bytes;
    ojson summary;
    summary["fastround_model_free"] = accounting;
    summary["quantized_layers"] = result.quantized_layers.size();
    summary["kept_layers"] = result.ignored_layers.size();
    summary["shards"] = n;
    result.summary = summary;
    write_text_atomic(staging / kSummaryFile, python_json_dumps(summary));
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string name = e.path().filename().string();
      if ((e.is_regular_file() && is_weight_file(name)) || is_stale_metadata(name)) continue;
      if (fs::exists(out / name) || fs::exists(staging / name)) continue;
      copy_tree(e.path(), staging / name);
    }
    std::error_code ec;
    fs::remove_all(staging / kDownloadDir, ec);
    manifest.retire();
    publish(staging, out, result.shard_files, log);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    char line[512];
    std::snprintf(line, sizeof line,
                  "[model_free] summary: %llu tensors quantized (%s), %llu kept (%s), %llu dropped (%s); "
                  "%.1f%% of source bytes quantized; output %s in %.2f s",
                  static_cast<unsigned long long>(accounting["quantized"]["tensors"].get<uint64_t>()),
                  human_bytes(qb).c_str(),
                  static_cast<unsigned long long>(accounting["kept"]["tensors"].get<uint64_t>()),
                  human_bytes(accounting["kept"]["bytes"].get<uint64_t>()).c_str(),
                  static_cast<unsigned long long>(accounting["dropped"]["tensors"].get<uint64_t>()),
                  human_bytes(accounting["dropped"]["bytes"].get<uint64_t>()).c_str(),
                  100.0 * accounting["quantized_bytes_fraction"].get<double>(), human_bytes(result.output_bytes).c_str(),
                  secs);
    log(LogLevel::Info, line);
  } catch (...) {
    std::error_code ec;
    if (manifest.done_count() == 0) {
      fs::remove_all(staging, ec);
      if (created_out && fs::is_empty(out, ec)) fs::remove(out, ec);
    } else {
      log(LogLevel::Warning, "[model_free] " + std::to_string(manifest.done_count()) +
                                 " finished shard(s) kept in '" + staging.string() +
                                 "'; rerun the same command to resume");
    }
    throw;
  }
  return result;
}

}  // namespace fastround
