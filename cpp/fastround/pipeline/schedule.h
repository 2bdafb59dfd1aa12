// Which source shard runs when, and which are open: FP8 scale donors first, streamed shards fetched and
// released through the callbacks, and how many shards run at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "fastround/common/error.h"
#include "fastround/io/safetensors.h"
#include "fastround/pipeline/model_free.h"
#include "fastround/pipeline/shard_plan.h"

namespace fastround {

namespace fs = std::filesystem;

// Shards that hold an FP8 scale for a weight elsewhere run first (donors before recipients, otherwise
// source order), so a recipient finds its scale; returns recipient -> donors.
std::map<std::string, std::set<std::string>> order_for_donors(std::vector<std::string>& shards,
                                                              const std::map<std::string, std::string>& homes,
                                                              Logger& log);

// Opens source shards, fetching streamed ones through the callback, and lets each go once every shard
// that needs it (itself, and recipients of its scales) has finished.
class ShardStore {
 public:
  ShardStore(fs::path src, fs::path download_dir, const ModelFreeCallbacks& cb)
      : src_(std::move(src)), download_dir_(std::move(download_dir)), cb_(cb) {}

  void pin(const std::string& shard) {
    std::lock_guard<std::mutex> lock(mu_);
    ++pins_[shard];
  }

  std::shared_ptr<SafetensorsReader> open(const std::string& shard, const std::vector<std::string>& upcoming) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = open_.find(shard);
      if (it != open_.end()) return it->second;
    }
    fs::path path = src_ / shard;
    if (!fs::is_regular_file(path)) {
      if (!cb_.fetch_shard)
        throw MissingPathError("[model_free] shard '" + shard + "' is missing from '" + src_.string() + "'");
      fs::create_directories(download_dir_);
      path = cb_.fetch_shard(shard, download_dir_.string(), upcoming);
      if (path.empty() || !fs::is_regular_file(path))
        throw MissingPathError("[model_free] fetching shard '" + shard + "' gave no file (got '" + path.string() + "')");
      std::lock_guard<std::mutex> lock(mu_);
      fetched_.insert(shard);
    }
    auto reader = std::make_shared<SafetensorsReader>(path);
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, fresh] = open_.emplace(shard, reader);
    return it->second;
  }

  void unpin(const std::string& shard) {
    bool release = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pins_[shard] > 0) return;
      open_.erase(shard);
      release = fetched_.erase(shard) > 0;
    }
    if (release && cb_.release_shard) cb_.release_shard(shard);
  }

 private:
  fs::path src_, download_dir_;
  const ModelFreeCallbacks& cb_;
  std::mutex mu_;
  std::map<std::string, int> pins_;
  std::map<std::string, std::shared_ptr<SafetensorsReader>> open_;
  std::set<std::string> fetched_;
};

// MemAvailable from /proc/meminfo (8 GiB where unknown).
uint64_t available_memory_bytes();

// Shards in flight: asked for, else as many as a quarter of free RAM holds at ~3x the largest tensor
// each (mapped input pages, output buffers, a dequantized copy), at most one per two cores.
int choose_parallelism(const ModelFreeJob& job, size_t shard_count, uint64_t largest_tensor, Logger& log);

}  // namespace fastround
