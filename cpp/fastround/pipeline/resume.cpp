#include "fastround/pipeline/resume.h"

#include <sys/stat.h>

#include "fastround/common/error.h"
#include "fastround/io/files.h"

namespace fastround {

namespace fs = std::filesystem;

namespace {

uint64_t fnv1a(uint64_t h, const std::string& bytes) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string to_hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// "scheme: "W4A16" -> "W8A16"" for each option that differs; a part name for anything else.
std::string explain_mismatch(const ojson& old_parts, const ojson& new_parts) {
  std::string why;
  auto add = [&](const std::string& s) { why += (why.empty() ? "" : "; ") + s; };
  for (const auto& [name, value] : new_parts.items()) {
    if (!old_parts.contains(name)) {
      add(name + " is new");
      continue;
    }
    const ojson& old = old_parts[name];
    if (old == value) continue;
    if (value.is_object() && old.is_object()) {
      for (const auto& [k, v] : value.items())
        if (!old.contains(k) || old[k] != v)
          add("option " + k + ": " + (old.contains(k) ? old[k].dump() : "unset") + " -> " + v.dump());
      for (const auto& [k, v] : old.items())
        if (!value.contains(k)) add("option " + k + ": " + v.dump() + " -> unset");
    } else {
      add(name + " changed");
    }
  }
  for (const auto& [name, value] : old_parts.items())
    if (!new_parts.contains(name)) add(name + " is gone");
  return why.empty() ? "fingerprint differs" : why;
}

}  // namespace

ojson ShardRecord::to_json() const {
  return ojson{{"source", source_name},       {"output", output_name}, {"output_bytes", output_bytes},
               {"tensors", tensor_names},     {"quantized", quantized}, {"ignored", ignored},
               {"accounting", accounting}};
}

ShardRecord ShardRecord::from_json(const ojson& j) {
  ShardRecord r;
  r.source_name = j.at("source").get<std::string>();
  r.output_name = j.at("output").get<std::string>();
  r.output_bytes = j.at("output_bytes").get<uint64_t>();
  r.tensor_names = j.at("tensors").get<std::vector<std::string>>();
  r.quantized = j.at("quantized").get<std::vector<std::string>>();
  r.ignored = j.at("ignored").get<std::vector<std::string>>();
  r.accounting = j.at("accounting");
  return r;
}

void Fingerprint::add(const std::string& part_name, const std::string& bytes) {
  const uint64_t part = fnv1a(1469598103934665603ull, bytes);
  parts_[part_name] = to_hex(part);
  h_ = fnv1a(h_, part_name + '\0' + to_hex(part) + '\0');
}

void Fingerprint::add_json(const std::string& part_name, const ojson& value) {
  h_ = fnv1a(h_, part_name + '\0' + value.dump() + '\0');
  parts_[part_name] = value;
}

void Fingerprint::add_file_stat(const std::string& part_name, const fs::path& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) throw IoError("[resume] cannot stat '" + file.string() + "'");
  // Size and modification time: cheap, and any rewrite of the source changes them.
  add(part_name, std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
                     std::to_string(st.st_mtim.tv_nsec));
}

std::string Fingerprint::hex() const { return to_hex(h_); }

ResumeManifest::ResumeManifest(fs::path staging, const Fingerprint& fp, std::string& message)
    : staging_(std::move(staging)), fingerprint_(fp.hex()), parts_(fp.parts()) {
  message.clear();
  const fs::path manifest = staging_ / kResumeManifestName;
  bool reuse = false;
  if (fs::exists(staging_)) {
    if (!fs::exists(manifest)) {
      message = "discarding partial output in '" + staging_.string() + "' (no resume manifest: no shard had finished)";
    } else {
      try {
        const ojson j = read_json_file(manifest);
        if (j.value("fingerprint", std::string()) != fingerprint_) {
          message = "discarding partial output in '" + staging_.string() + "' from an earlier run: " +
                    explain_mismatch(j.value("parts", ojson::object()), parts_) +
                    ". Starting over; rerun with the earlier options to keep it.";
        } else {
          for (const auto& rec : j.at("shards")) {
            ShardRecord r = ShardRecord::from_json(rec);
            const fs::path f = staging_ / r.output_name;
            std::error_code ec;
            if (fs::is_regular_file(f, ec) && fs::file_size(f, ec) == r.output_bytes) done_.emplace(r.output_name, r);
          }
          reuse = true;
          message = "resuming from '" + staging_.string() + "': " + std::to_string(done_.size()) +
                    " finished shard(s) kept";
        }
      } catch (const std::exception& e) {
        message = "discarding partial output in '" + staging_.string() + "': unreadable resume manifest (" + e.what() + ")";
      }
    }
  }
  if (!reuse) {
    done_.clear();
    fs::remove_all(staging_);
  }
  fs::create_directories(staging_);
  // Half-written files of a killed run, and finished files the manifest does not vouch for.
  for (const auto& e : fs::directory_iterator(staging_)) {
    const std::string n = e.path().filename().string();
    if (n == kResumeManifestName || done_.count(n) || e.is_directory()) continue;
    fs::remove(e.path());
  }
  std::lock_guard<std::mutex> lock(mu_);
  save_locked();
}

bool ResumeManifest::is_done(const std::string& output_name) const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_.count(output_name) != 0;
}

const ShardRecord* ResumeManifest::record(const std::string& output_name) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = done_.find(output_name);
  return it == done_.end() ? nullptr : &it->second;
}

void ResumeManifest::mark_done(const ShardRecord& r) {
  std::lock_guard<std::mutex> lock(mu_);
  done_[r.output_name] = r;
  save_locked();
}

size_t ResumeManifest::done_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_.size();
}

void ResumeManifest::save_locked() const {
  ojson shards = ojson::array();
  for (const auto& [name, r] : done_) shards.push_back(r.to_json());
  ojson j;
  j["fingerprint"] = fingerprint_;
  j["parts"] = parts_;
  j["shards"] = shards;
  write_text_atomic(staging_ / kResumeManifestName, j.dump(1));
}

void ResumeManifest::retire() {
  std::lock_guard<std::mutex> lock(mu_);
  std::error_code ec;
  fs::remove(staging_ / kResumeManifestName, ec);
}

}  // namespace fastround
