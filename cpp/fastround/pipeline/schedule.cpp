#include "fastround/pipeline/schedule.h"

#include <algorithm>
#include <fstream>
#include <queue>

#include "fastround/common/error.h"
#include "fastround/common/strings.h"
#include "fastround/common/parallel.h"

namespace fastround {

// Shards that hold an FP8 scale for a weight elsewhere run first (donors before recipients, otherwise
// source order), so a recipient finds its scale; returns recipient -> donors.
std::map<std::string, std::set<std::string>> order_for_donors(std::vector<std::string>& shards,
                                                              const std::map<std::string, std::string>& homes,
                                                              Logger& log) {
  std::map<std::string, std::set<std::string>> donors;
  const std::string suffix = ".weight_scale_inv";
  for (const auto& [tensor, donor] : homes) {
    if (!ends_with(tensor, suffix)) continue;
    auto w = homes.find(tensor.substr(0, tensor.size() - suffix.size()) + ".weight");
    if (w != homes.end() && w->second != donor) donors[w->second].insert(donor);
  }
  if (donors.empty()) return donors;
  std::map<std::string, size_t> pos;
  for (size_t i = 0; i < shards.size(); ++i) pos[shards[i]] = i;
  std::map<std::string, int> indegree;
  std::map<std::string, std::vector<std::string>> after;
  for (const auto& [recipient, ds] : donors)
    for (const auto& d : ds) {
      if (!pos.count(d) || !pos.count(recipient)) continue;
      ++indegree[recipient];
      after[d].push_back(recipient);
    }
  auto by_pos = [&](const std::string& a, const std::string& b) { return pos[a] > pos[b]; };
  std::priority_queue<std::string, std::vector<std::string>, decltype(by_pos)> ready(by_pos);
  for (const auto& s : shards)
    if (indegree[s] == 0) ready.push(s);
  std::vector<std::string> ordered;
  std::set<std::string> placed;
  while (!ready.empty()) {
    const std::string s = ready.top();
    ready.pop();
    ordered.push_back(s);
    placed.insert(s);
    for (const auto& r : after[s])
      if (--indegree[r] == 0) ready.push(r);
  }
  if (ordered.size() != shards.size()) {
    log(LogLevel::Warning, "[model_free] FP8 scale donations between shards form a cycle; keeping source order for the rest");
    for (const auto& s : shards)
      if (!placed.count(s)) ordered.push_back(s);
  }
  shards = ordered;
  return donors;
}

uint64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 8ull << 30;
}

// Shards in flight: asked for, else as many as a quarter of free RAM holds at ~3x the largest tensor
// each (mapped input pages, output buffers, a dequantized copy), at most one per two cores.
int choose_parallelism(const ModelFreeJob& job, size_t shard_count, uint64_t largest_tensor, Logger& log) {
  int p = job.shard_parallelism;
  if (p <= 0) {
    const uint64_t per_worker = 3 * std::max<uint64_t>(largest_tensor, 64ull << 20) + (64ull << 20);
    const uint64_t by_memory = available_memory_bytes() / 4 / per_worker;
    p = static_cast<int>(std::min<uint64_t>(by_memory, static_cast<uint64_t>(std::max(1, max_threads() / 2))));
  }
  p = std::max(1, std::min<int>(p, static_cast<int>(std::max<size_t>(shard_count, 1))));
  log(LogLevel::Debug, "[model_free] " + std::to_string(p) + " shard(s) in flight");
  return p;
}

}  // namespace fastround
