// The staged CUDA GEMV's launch planner (woq_cuda.cu plan_staged): the cost model of one launch, in plain C++ so
// that CPU tests can replay it (cpp/tests/test_woq_cuda_plan.cpp). The model and its fit are described in
// woq_cuda.cu above plan_staged.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastround::infer::gpu {

inline constexpr int kStagedThreads = 256;  // threads per block of the staged kernel

struct StagedShape {
  int64_t rows, out;  // qweight rows (in * bits / 32) and columns
  int bits, mt;       // bits per code, batch rows of the kernel template
  int sms;
  double clock_ghz;
  bool half2;         // the half2 variant: about 19 instructions per word of 8 codes (word_dot_half2)
};

struct StagedSetting {
  int u, tx, split;
  int per_sm;  // resident blocks per SM (occupancy, with the setting's shared memory); prefetch costs the same
};

inline constexpr double kRoundTripUs = 0.35;
inline constexpr double kPerLoadUs = 0.013;
inline constexpr double kLoneCpi = 3.4;
inline constexpr double kSharedCpi = 1.4;
inline constexpr double kStageUs = 0.25;
inline constexpr double kClusterUs = 0.75;

inline double cluster_sm_share(int split) { return split <= 2 ? 1.0 : split == 4 ? 0.85 : 0.77; }

struct StagedCost {
  double us;
  int64_t chain, waves;
};

inline StagedCost staged_cost(const StagedShape& p, const StagedSetting& s) {
  const int64_t ty = kStagedThreads / s.tx, ct = 4 * int64_t{s.tx};
  const int64_t blocks = (p.out + ct - 1) / ct * s.split;
  const int64_t chunks_blk = (p.rows / s.u + s.split - 1) / s.split;
  const int64_t chain = (chunks_blk + ty - 1) / ty;
  const double busy = static_cast<double>(std::min(chunks_blk, ty)) / static_cast<double>(ty);
  const int64_t bsm = static_cast<int64_t>(std::ceil(static_cast<double>(blocks) /
                                                     (static_cast<double>(p.sms) * cluster_sm_share(s.split))));
  const int64_t conc = std::min<int64_t>(bsm, s.per_sm);
  const int64_t waves = (bsm + s.per_sm - 1) / s.per_sm;
  const int codes = 4 * (32 / p.bits);
  const double instr = static_cast<double>(s.u) * (p.half2 ? 4 * 19 : codes * (2 + p.mt) + 4);
  const double warps = static_cast<double>(conc) * (kStagedThreads / 32) * busy;
  const double compute_us = instr * std::max(kLoneCpi, warps * kSharedCpi / 4.0) / (p.clock_ghz * 1e3);
  const double step_us = kRoundTripUs + kPerLoadUs * s.u + compute_us;
  const double staged_inputs = static_cast<double>(chunks_blk * s.u * (32 / p.bits) * p.mt);
  const double block_us = kStageUs * static_cast<double>(conc) * staged_inputs / 4096.0 +
                          static_cast<double>(chain) * step_us + (s.split > 1 ? kClusterUs : 0.0);
  return {static_cast<double>(waves) * block_us, chain, waves};
}

// The automatic choice leaves U = 16 to problems where each worker has one chunk and all blocks fit one wave.
inline bool staged_auto_admits(int u, const StagedCost& c) { return u != 16 || (c.chain == 1 && c.waves == 1); }

// The tensor-core GEMV (woq_cuda.cu gemv_gptq_mma_kernel): blocks of 32 columns x 8 warps, each warp a run of
// steps (4 qweight rows) of its block's share of the inputs, U steps' loads in flight at once. A chunk of U steps is one
// round trip to memory, so a block takes about its warps' chunks, and waves of resident blocks add up; a cluster
// barrier costs about half a round trip. Not fitted yet (the H200 sweep, woq_cuda_bench.py --mma, should fit it).
inline constexpr int kMmaWarps = kStagedThreads / 32;

inline double mma_cost(int64_t steps, int64_t tiles, int sms, int per_sm, int u, int split) {
  const int64_t warp_steps = (steps / split + kMmaWarps - 1) / kMmaWarps;
  const double resident = static_cast<double>(sms) * per_sm * cluster_sm_share(split);
  const double waves = std::ceil(static_cast<double>(tiles * split) / resident);
  return waves * (static_cast<double>((warp_steps + u - 1) / u) + (split > 1 ? 0.5 : 0.0));
}

// Whether the automatic choice considers `split`: every warp has at least one step.
inline bool mma_auto_admits(int64_t steps, int split) { return split == 1 || steps / split >= kMmaWarps; }

}  // namespace fastround::infer::gpu
