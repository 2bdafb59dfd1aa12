// The staged CUDA GEMV's launch planner (infer/woq_cuda_plan.h) replayed on the H200 sweep it was fitted to
// (benchmarks/results/woq_cuda_staged-h200.json): over the settings woq_cuda.cu instantiates at batch 1, with the
// H200's 132 SMs and the occupancy the kernels' registers (ptxas -v: U 4 / 8 / 16 -> 4 / 3 / 2 blocks per SM) and
// shared memory allow, the automatic choice must be a setting the sweep timed within 3% of the shape's best. The
// choices are pinned too (a changed model must be re-checked against the sweep), and the cost must grow with the
// work. The tensor-core GEMV's model (mma_cost, not fitted yet) has its Llama choices pinned the same way. Plain C++,
// no GPU; tests/test_woq_cuda_plan.py runs it. Ends with "N passed, N failed".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "fastround/infer/woq_cuda_plan.h"
#include "test_harness.h"

namespace fg = fastround::infer::gpu;

using fastround::test::check;

namespace {

// H200 occupancy of the staged kernel at batch 1: registers (blocks per SM by U) and 228 KiB of shared memory per SM,
// a block's share being its activation slice (rows * (PF + 1) fp32), reduce_store's 9 * CT fp32 and 1 KiB reserved.
int h200_blocks_per_sm(int u, int tx, int64_t rows_blk, int pf) {
  const int by_regs = u == 4 ? 4 : u == 8 ? 3 : 2;
  const int64_t smem = rows_blk * (pf + 1) * 4 + 9 * 4 * tx * 4 + 1024;
  return static_cast<int>(std::min<int64_t>({by_regs, 228 * 1024 / smem, 8}));
}

struct Choice {
  int u = 0, split = 0, tx = 0;
};

Choice plan(int64_t in, int64_t out, int bits) {
  const int64_t rows = in * bits / 32;
  const int pf = 32 / bits;
  const fg::StagedShape shape{rows, out, bits, 1, 132, 1.98, false};
  Choice best;
  double best_cost = 0.0;
  for (int u : {8, 16, 4}) {
    if (bits == 8 && u == 16) continue;  // not instantiated at 8 bits
    if (128 % (u * pf) != 0) continue;   // a chunk inside one group of 128
    for (int tx : {32, 16, 8}) {
      if (bits == 8 && tx == 8) continue;
      for (int split = 1; split <= 8; split *= 2) {
        const int64_t chunks_blk = (rows / u + split - 1) / split;
        const fg::StagedSetting s{u, tx, split, h200_blocks_per_sm(u, tx, chunks_blk * u, pf)};
        const fg::StagedCost c = fg::staged_cost(shape, s);
        if (!fg::staged_auto_admits(u, c)) continue;
        if (best.u == 0 || c.us < best_cost * (1.0 - 1e-9)) {
          best = {u, split, tx};
          best_cost = c.us;
        }
      }
    }
  }
  return best;
}

}  // namespace

int main() {
  // (in, out, bits, the pinned choice U,S,T, its sweep time, the shape's best sweep time) in us.
  struct Case {
    int64_t in, out;
    int bits;
    Choice want;
    double us, best_us;
  };
  const Case cases[] = {
      {4096, 4096, 4, {16, 1, 8}, 7.88, 7.81},    {4096, 1024, 4, {4, 8, 8}, 4.74, 4.74},
      {4096, 14336, 4, {8, 1, 16}, 19.30, 19.30}, {14336, 4096, 4, {4, 2, 8}, 20.43, 20.05},
      {4096, 14336, 8, {8, 1, 16}, 24.11, 24.11}, {4096, 1024, 8, {8, 8, 16}, 5.47, 5.45},
      {14336, 4096, 8, {8, 8, 32}, 27.89, 27.39},
  };
  for (const Case& c : cases) {
    const Choice got = plan(c.in, c.out, c.bits);
    const std::string name = std::to_string(c.bits) + " bits " + std::to_string(c.in) + "x" + std::to_string(c.out);
    check(got.u == c.want.u && got.split == c.want.split && got.tx == c.want.tx,
          name + ": chose " + std::to_string(got.u) + "," + std::to_string(got.split) + "," + std::to_string(got.tx));
    check(c.us <= 1.03 * c.best_us, name + ": the pinned choice is within 3% of the sweep's best");
  }
  // More rows or columns never cost less; a second wave costs more than one.
  const fg::StagedShape small{512, 4096, 4, 1, 132, 1.98, false}, deep{1792, 4096, 4, 1, 132, 1.98, false};
  const fg::StagedSetting s{8, 8, 2, 3};
  check(fg::staged_cost(deep, s).us > fg::staged_cost(small, s).us, "more rows cost more");
  const fg::StagedShape wide{512, 16384, 4, 1, 132, 1.98, false};
  check(fg::staged_cost(wide, s).waves > fg::staged_cost(small, s).waves &&
            fg::staged_cost(wide, s).us > fg::staged_cost(small, s).us,
        "more columns than one wave holds cost more");
  // The half2 variant issues fewer instructions per chunk: never dearer than the fp32 path.
  const fg::StagedShape small_h2{512, 4096, 4, 1, 132, 1.98, true};
  check(fg::staged_cost(small_h2, s).us < fg::staged_cost(small, s).us, "half2 costs less");
  // The mma kernel's model (H200: 132 SMs, 2 blocks per SM at U 4 and 8: launch bounds and registers).
  auto mma_plan = [](int64_t in, int64_t out) {
    const int64_t steps = in / 32, tiles = (out + 31) / 32;
    Choice best;
    double best_cost = 0.0;
    for (int u : {4, 8})
      for (int split = 1; split <= 8; split *= 2) {
        if (!fg::mma_auto_admits(steps, split)) break;
        const double c = fg::mma_cost(steps, tiles, 132, 2, u, split);
        if (best.u == 0 || c < best_cost * (1.0 - 1e-9)) {
          best = {u, split, 0};
          best_cost = c;
        }
      }
    return best;
  };
  // Pinned choices on the Llama-3-8B shapes (a changed model must be re-checked against the sweep): the column
  // tiles alone fill the SMs on the wide shapes, the narrow ones split the inputs over clusters.
  const struct {
    int64_t in, out;
    int u, split;
  } mma_pins[] = {{4096, 4096, 8, 2}, {4096, 1024, 4, 4}, {4096, 14336, 8, 1}, {14336, 4096, 8, 2}};
  for (const auto& p : mma_pins) {
    const Choice c = mma_plan(p.in, p.out);
    const std::string name = "mma " + std::to_string(p.in) + "x" + std::to_string(p.out);
    check(c.u == p.u && c.split == p.split,
          name + ": chose U " + std::to_string(c.u) + " split " + std::to_string(c.split));
  }
  // Every warp gets a step; more steps or a second wave never cost less.
  check(!fg::mma_auto_admits(64, 16) && fg::mma_auto_admits(64, 8) && fg::mma_auto_admits(4, 1), "one step a warp");
  check(fg::mma_cost(448, 128, 132, 2, 8, 2) > fg::mma_cost(128, 128, 132, 2, 8, 2), "more steps cost more");
  check(fg::mma_cost(128, 448, 132, 2, 8, 2) > fg::mma_cost(128, 128, 132, 2, 8, 2), "a second wave costs more");
  return fastround::test::report();
}
