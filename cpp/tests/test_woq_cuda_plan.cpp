// The staged CUDA GEMV's launch planner (infer/woq_cuda_plan.h) replayed on the H200 sweep it was fitted to
// (benchmarks/results/woq_cuda_staged-h200.json): over the settings woq_cuda.cu instantiates at batch 1, with the
// H200's 132 SMs and the occupancy the kernels' registers (ptxas -v: U 4 / 8 / 16 -> 4 / 3 / 2 blocks per SM) and
// shared memory allow, the automatic choice must be a setting the sweep timed within 3% of the shape's best. The
// choices are pinned too (a changed model must be re-checked against the sweep), and the cost must grow with the
// work. Plain C++, no GPU; tests/test_woq_cuda_plan.py runs it. Ends with "N passed, N failed".
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
  return fastround::test::report();
}
