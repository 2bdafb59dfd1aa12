// Crash-safe resume: a manifest of finished output shards, bound to a fingerprint of the job options and
// the source. A rerun of the same command reuses finished shards; anything else starts over, saying why.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace fastround {

using ojson = nlohmann::ordered_json;

// What a finished shard contributed to the run; enough to publish it without reading its source again.
struct ShardRecord {
  std::string source_name;
  std::string output_name;
  uint64_t output_bytes = 0;              // size of the committed output file
  std::vector<std::string> tensor_names;  // weight_map entries, in write order
  std::vector<std::string> quantized, ignored;
  ojson accounting = ojson::object();     // per-category counts and bytes of the source tensors

  ojson to_json() const;
  static ShardRecord from_json(const ojson& j);
};

// 64-bit FNV-1a; the fingerprint detects accidental changes, it is not a security hash.
class Fingerprint {
 public:
  void add(const std::string& part_name, const std::string& bytes);
  // Kept verbatim in parts() so a mismatch can name the changed option.
  void add_json(const std::string& part_name, const ojson& value);
  void add_file_stat(const std::string& part_name, const std::filesystem::path& file);
  std::string hex() const;
  const ojson& parts() const { return parts_; }  // part name -> hex hash (or literal), for explaining a mismatch

 private:
  uint64_t h_ = 1469598103934665603ull;
  ojson parts_ = ojson::object();
};

// The manifest lives in the staging folder; every update is an atomic file replace.
class ResumeManifest {
 public:
  // Opens `staging`: keeps finished shards when the stored fingerprint matches, else wipes the folder.
  // `message` receives why earlier partial output was reused or discarded (empty when there was none).
  ResumeManifest(std::filesystem::path staging, const Fingerprint& fp, std::string& message);

  bool is_done(const std::string& output_name) const;
  const ShardRecord* record(const std::string& output_name) const;
  // Records a committed shard; thread-safe.
  void mark_done(const ShardRecord& r);
  size_t done_count() const;
  const std::filesystem::path& staging() const { return staging_; }
  // Removes the manifest (the run is publishing).
  void retire();

 private:
  void save_locked() const;
  std::filesystem::path staging_;
  std::string fingerprint_;
  ojson parts_;
  std::map<std::string, ShardRecord> done_;
  mutable std::mutex mu_;
};

inline constexpr const char* kResumeManifestName = "fastround-resume.json";

}  // namespace fastround
