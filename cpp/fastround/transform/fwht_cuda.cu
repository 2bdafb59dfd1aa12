#include "fastround/transform/fwht_cuda.h"

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <utility>
#include <stdexcept>
#include <string>

#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/transform/fwht_butterfly.cuh"

namespace fastround::transform::gpu {

namespace {

constexpr int kMaxThreads = 256;
constexpr int kTileTarget = 2048;  // elements per thread block when blocks are small: 256 threads x 8

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Storage types and their exact widening / RNE narrowing (the CPU's half.h / fp_codes.h functions, so ties and NaNs
// round alike on both sides).
struct F32 {
  using T = float;
  using C = float;
  using TO = T;
  __device__ static float in(float v) { return v; }
  __device__ static float out(float v) { return v; }
};
struct F64 {
  using T = double;
  using C = double;
  using TO = T;
  __device__ static double in(double v) { return v; }
  __device__ static double out(double v) { return v; }
};
struct F16 {
  using T = uint16_t;
  using C = float;
  using TO = T;
  __device__ static float in(uint16_t v) { return fp16_to_float(v); }
  __device__ static uint16_t out(float v) { return float_to_fp16(v); }
};
struct BF16 {
  using T = uint16_t;
  using C = float;
  using TO = T;
  __device__ static float in(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t out(float v) { return float_to_bf16(v); }
};
// IO's input, stored unrounded in the compute type: the split plan's butterfly pass writes its scratch through it, so
// the K-mix kernel reads exactly the values the one-kernel plan keeps in shared memory.
template <typename IO>
struct ToCompute {
  using T = typename IO::T;
  using C = typename IO::C;
  using TO = C;
  __device__ static C in(T v) { return IO::in(v); }
  __device__ static C out(C v) { return v; }
};

template <typename C>
struct Params {
  const void* x;
  void* y;
  int64_t blocks;  // n-blocks in the whole buffer
  int n, len, k, bpt;
  int sign_n;           // period of the sign vector (n; the split plan's butterfly pass runs on len-blocks of n-blocks)
  const int8_t* hadk;   // [k, k] device, or null
  const int8_t* signs;  // [n] device, or null
  bool transpose, signs_first, normalize, vec;
  C c;
};

// 16-byte vector accesses of 8 consecutive values (the launcher checked the base pointers' alignment; element offsets
// are multiples of 8): 8 halves in one uint4, 8 floats in two float4, 8 doubles in four double2.
__device__ __forceinline__ void vload8(const uint16_t* p, uint16_t v[8]) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) v[2 * j] = static_cast<uint16_t>(u[j] & 0xFFFFu), v[2 * j + 1] = static_cast<uint16_t>(u[j] >> 16);
}
__device__ __forceinline__ void vstore8(uint16_t* p, const uint16_t v[8]) {
  uint32_t u[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) u[j] = static_cast<uint32_t>(v[2 * j]) | (static_cast<uint32_t>(v[2 * j + 1]) << 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
}
template <bool Global>
__device__ __forceinline__ void vload8(const float* p, float v[8]) {
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    const float4 q = Global ? __ldg(reinterpret_cast<const float4*>(p) + w) : reinterpret_cast<const float4*>(p)[w];
    v[4 * w] = q.x, v[4 * w + 1] = q.y, v[4 * w + 2] = q.z, v[4 * w + 3] = q.w;
  }
}
__device__ __forceinline__ void vload8(const float* p, float v[8]) { vload8<true>(p, v); }
__device__ __forceinline__ void vstore8(float* p, const float v[8]) {
#pragma unroll
  for (int w = 0; w < 2; ++w) reinterpret_cast<float4*>(p)[w] = make_float4(v[4 * w], v[4 * w + 1], v[4 * w + 2], v[4 * w + 3]);
}
template <bool Global>
__device__ __forceinline__ void vload8(const double* p, double v[8]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const double2 q = Global ? __ldg(reinterpret_cast<const double2*>(p) + w) : reinterpret_cast<const double2*>(p)[w];
    v[2 * w] = q.x, v[2 * w + 1] = q.y;
  }
}
__device__ __forceinline__ void vload8(const double* p, double v[8]) { vload8<true>(p, v); }
__device__ __forceinline__ void vstore8(double* p, const double v[8]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) reinterpret_cast<double2*>(p)[w] = make_double2(v[2 * w], v[2 * w + 1]);
}

// 8 consecutive storage values widened to the compute type; element by element up to `count` where the vector
// access does not apply (unaligned buffers, the buffer's last partial group).
template <typename IO>
__device__ __forceinline__ void load8(const typename IO::T* p, bool vec, int count, typename IO::C v[8]) {
  if (vec && count >= 8) {
    typename IO::T raw[8];
    vload8(p, raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = IO::in(raw[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = j < count ? IO::in(p[j]) : typename IO::C(0);
}

template <typename IO>
__device__ __forceinline__ void store8(typename IO::TO* p, bool vec, int count, const typename IO::C v[8]) {
  if (vec && count >= 8) {
    typename IO::TO raw[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) raw[j] = IO::out(v[j]);
    vstore8(p, raw);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < count) p[j] = IO::out(v[j]);
}

// Shared-memory copies of 8 consecutive compute-type values (offsets are multiples of 8, so aligned).
template <typename C>
__device__ __forceinline__ void sload8(const C* s, C v[8]) { vload8<false>(s, v); }
template <typename C>
__device__ __forceinline__ void sstore8(C* s, const C v[8]) { vstore8(s, v); }

// Scale, trailing signs and store of 8 outputs starting at tile element e0.
template <typename IO>
__device__ __forceinline__ void finish8(const Params<typename IO::C>& p, typename IO::TO* y, int e0, int count,
                                        typename IO::C v[8]) {
  if (p.normalize) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = rmul(v[j], p.c);
  }
  if (p.signs && !p.signs_first) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < count) v[j] = apply_sign(v[j], __ldg(p.signs + (e0 + j) % p.sign_n));
  }
  store8<IO>(y + e0, p.vec, count, v);
}

// finish8's scale, trailing sign and store for the one output at tile element e.
template <typename IO>
__device__ __forceinline__ void finish1(const Params<typename IO::C>& p, typename IO::TO* y, int e, typename IO::C v) {
  if (p.normalize) v = rmul(v, p.c);
  if (p.signs && !p.signs_first) v = apply_sign(v, __ldg(p.signs + e % p.sign_n));
  y[e] = IO::out(v);
}

// radix-R pass over shared memory for data strides h, 2h, ... (h >= 256, a power of two): group q takes the R
// elements base + j·h; consecutive threads take consecutive bases, so a warp reads 32 consecutive words.
template <int R, typename C>
__device__ __forceinline__ void smem_pass(C* s, int valid, int h, int log_h) {
  const int groups = valid / R;
  for (int q = threadIdx.x; q < groups; q += blockDim.x) {
    const int low = q & (h - 1), high = q >> log_h;
    C* base = s + high * R * h + low;
    C v[R];
#pragma unroll
    for (int j = 0; j < R; ++j) v[j] = base[j * h];
    radix<R>(v, R);
#pragma unroll
    for (int j = 0; j < R; ++j) base[j * h] = v[j];
  }
}

// The K stage for len % 8 == 0, blocked in registers: one work item is KB consecutive outputs k0 .. k0+KB-1 times 8
// consecutive r of one n-block, so each y[k'][r..r+8) read from shared memory feeds KB accumulators (the stage
// is bound by those reads otherwise: K = 224 is 224 reads per output). Each accumulator still adds k' = 0, 1, ...
// in order from 0; a - b is spelled a + (-b), the same IEEE operation, so lanes with different signs don't diverge.
// The K stage of 8 consecutive r for outputs k0 .. k0+KB-1 of one n-block, src at its (k' = 0, r) element (shared
// memory, or global scratch for the split plan): acc[q][j] = sum over k' of ±src[k' * len + j], added k' = 0, 1, ...
// in order from 0, so the one-kernel and split plans give the same bits.
template <int KB, bool Global, typename C>
__device__ __forceinline__ void kmix8(const Params<C>& p, const C* src, int k0, C (&acc)[KB][8]) {
#pragma unroll
  for (int q = 0; q < KB; ++q)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[q][j] = C(0);
  // Entry (k0 + q, kp) of the applied matrix sits at row_base[q] + kp * col_step.
  const int col_step = p.transpose ? p.k : 1;
  const int row_step = p.transpose ? 1 : p.k;
  const int8_t* hrow = p.hadk + k0 * row_step;
  // Unrolled so that several k' reads are in flight at once (the one-kernel plan's R4 row: 22.5 -> 18 us on the H200)
#pragma unroll 4
  for (int kp = 0; kp < p.k; ++kp) {
    C in[8];
    vload8<Global>(src + static_cast<int64_t>(kp) * p.len, in);
#pragma unroll
    for (int q = 0; q < KB; ++q) {
      const bool plus = __ldg(hrow + q * row_step + kp * col_step) > 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[q][j] = radd(acc[q][j], plus ? in[j] : -in[j]);
    }
  }
}

template <int KB, typename IO>
__device__ __forceinline__ void kstage_blocked(const Params<typename IO::C>& p, const typename IO::C* s,
                                               typename IO::TO* y, int tile_blocks) {
  using C = typename IO::C;
  const int rgroups = p.len / 8, kchunks = p.k / KB;
  const int items = tile_blocks * kchunks * rgroups;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int rg = it % rgroups, rest = it / rgroups, kc = rest % kchunks, b = rest / kchunks;
    const int r0 = rg * 8, k0 = kc * KB;
    C acc[KB][8];
    kmix8<KB, false>(p, s + b * p.n + r0, k0, acc);
#pragma unroll
    for (int q = 0; q < KB; ++q) finish8<IO>(p, y, b * p.n + (k0 + q) * p.len + r0, 8, acc[q]);
  }
}

template <typename IO>
__device__ __forceinline__ void phase3_plain(const Params<typename IO::C>& p, const typename IO::C* s,
                                             typename IO::TO* y, int valid, int groups);

// Phase 1 of a tile of `valid` elements (x, y and sign_base at its start): load, leading signs, strides 1..4 in
// registers, 8..128 across the warp; then into s (through_smem) or scaled, signed and stored to y. Every lane of a
// warp runs the same iterations (the bound is rounded up to the block size): the shuffles need all 32; lanes past
// the tile hold zeros that no valid element pairs with (a stride-h partner lies in the same len-long segment).
template <typename IO>
__device__ __forceinline__ void low_stages(const Params<typename IO::C>& p, const typename IO::T* x,
                                           typename IO::TO* y, typename IO::C* s, int valid, int sign_base,
                                           bool through_smem) {
  using C = typename IO::C;
  const int lane = threadIdx.x & 31;
  const int groups = (valid + 7) / 8;
  const int rounds = (groups + blockDim.x - 1) / blockDim.x;
  for (int it = 0; it < rounds; ++it) {
    const int g = it * blockDim.x + threadIdx.x;
    const int e0 = g * 8;
    const int count = g < groups ? min(8, valid - e0) : 0;
    C v[8];
    load8<IO>(x + e0, p.vec, count, v);
    if (p.signs && p.signs_first) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < count) v[j] = apply_sign(v[j], __ldg(p.signs + (sign_base + e0 + j) % p.sign_n));
    }
    radix<8>(v, p.len);
    shuffle_stages(v, p.len, lane);
    if (count == 0) continue;
    if (!through_smem) {
      finish8<IO>(p, y, e0, count, v);
    } else if (count == 8) {
      sstore8(s + e0, v);
    } else {
      for (int j = 0; j < count; ++j) s[e0 + j] = v[j];
    }
  }
}

// Phase 2, after phase 1 filled s and a barrier: strides 256 .. len/2 through shared memory, up to three per pass,
// a barrier after each.
template <typename C>
__device__ __forceinline__ void smem_stages(C* s, int valid, int len) {
  for (int h = 2 * kShuffleTop, log_h = 8; h < len;) {
    const int r = len / h;
    if (r >= 8) {
      smem_pass<8>(s, valid, h, log_h);
      h *= 8, log_h += 3;
    } else if (r == 4) {
      smem_pass<4>(s, valid, h, log_h);
      h *= 4, log_h += 2;
    } else {
      smem_pass<2>(s, valid, h, log_h);
      h *= 2, log_h += 1;
    }
    __syncthreads();
  }
}

// One tile (bpt consecutive n-blocks) per thread block. KB > 0: the K stage register-blocked by KB (kstage_blocked; K % KB == 0, len % 8 == 0), a separate instantiation so
// the accumulators' registers don't lower the occupancy of the other shapes; KB = 0: K = 1 or len < 8.
template <typename IO, int KB>
__global__ void __launch_bounds__(kMaxThreads) fwht_kernel(const Params<typename IO::C> p) {
  using C = typename IO::C;
  using T = typename IO::T;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* s = reinterpret_cast<C*>(smem_raw);

  const int64_t first_block = static_cast<int64_t>(blockIdx.x) * p.bpt;
  const int tile_blocks = static_cast<int>(p.blocks - first_block < p.bpt ? p.blocks - first_block : p.bpt);
  const int valid = tile_blocks * p.n;  // elements of this tile
  const int groups = (valid + 7) / 8;
  const T* x = static_cast<const T*>(p.x) + first_block * p.n;
  typename IO::TO* y = static_cast<typename IO::TO*>(p.y) + first_block * p.n;
  // Where this tile starts in the sign vector's period: 0 when tiles are whole n-blocks; the split plan's butterfly
  // pass tiles len-blocks, whose leading signs continue across its tiles
  const int sign_base = p.signs ? static_cast<int>(first_block * p.n % p.sign_n) : 0;
  const bool through_smem = p.k > 1 || p.len > 2 * kShuffleTop;

  low_stages<IO>(p, x, y, s, valid, sign_base, through_smem);
  if (!through_smem) return;
  __syncthreads();
  smem_stages(s, valid, p.len);

  // Phase 3: the K stage (out[k][r] = sum over k' ascending, from 0, of ±y[k'][r]), scale, trailing signs, store.
  if constexpr (KB > 0) {
    kstage_blocked<KB, IO>(p, s, y, tile_blocks);
  } else {
    phase3_plain<IO>(p, s, y, valid, groups);
  }
}

// Phase 3 without register blocking: K = 1 (smem -> scale, signs, store) or len < 8 (each output's K sum alone).
template <typename IO>
__device__ __forceinline__ void phase3_plain(const Params<typename IO::C>& p, const typename IO::C* s,
                                             typename IO::TO* y, int valid, int groups) {
  using C = typename IO::C;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const int e0 = g * 8;
    const int count = min(8, valid - e0);
    C v[8];
    if (p.k == 1) {
      if (count == 8) {
        sload8(s + e0, v);
      } else {
        for (int j = 0; j < 8; ++j) v[j] = j < count ? s[e0 + j] : C(0);
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        C acc = C(0);
        if (j < count) {
          const int e = e0 + j, blk = e / p.n * p.n, i = e - blk, kk = i / p.len, r = i - kk * p.len;
          for (int kp = 0; kp < p.k; ++kp) {
            const int8_t hv = __ldg(p.hadk + (p.transpose ? kp * p.k + kk : kk * p.k + kp));
            const C in = s[blk + kp * p.len + r];
            acc = hv > 0 ? radd(acc, in) : rsub(acc, in);
          }
        }
        v[j] = acc;
      }
    }
    finish8<IO>(p, y, e0, count, v);
  }
}

// The split plan's K stage (few n-blocks: one thread block per tile would leave the GPU idle and walk the K·n sums
// on one SM): t holds the butterfly pass's result (each len-long segment transformed, leading signs applied,
// unrounded, [blocks, n] compute type); one work item is KB consecutive outputs k0 .. k0+KB-1 times 8 consecutive r
// of one n-block, the items spread over the whole grid. Each accumulator adds k' = 0, 1, ... in order from 0, as
// kstage_blocked does, so the bits are the one-kernel plan's.
constexpr int kMixThreads = 128;
constexpr int kHighRadix = 8;  // the K = 1 split and cluster plans' last stages: 8 chunks x 8 offsets in one thread's registers

template <int KB, typename IO>
__global__ void __launch_bounds__(kMixThreads) kmix_kernel(const Params<typename IO::C> p, const typename IO::C* t) {
  using C = typename IO::C;
  const int rgroups = p.len / 8, kchunks = p.k / KB;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (it >= p.blocks * kchunks * rgroups) return;
  const int rg = static_cast<int>(it % rgroups), kc = static_cast<int>(it / rgroups % kchunks);
  const int64_t b = it / rgroups / kchunks;
  const int r0 = rg * 8, k0 = kc * KB;
  typename IO::TO* y = static_cast<typename IO::TO*>(p.y) + b * p.n;
  C acc[KB][8];
  kmix8<KB, true>(p, t + b * p.n + r0, k0, acc);
#pragma unroll
  for (int q = 0; q < KB; ++q) finish8<IO>(p, y, (k0 + q) * p.len + r0, 8, acc[q]);
}

// The K = 1 split plan's second kernel (a power-of-two n-block of a few rows: one thread block per n-block left
// the GPU idle). t holds the butterfly pass's result: strides 1 .. chunk/2 of every chunk-long segment, leading signs
// applied, unrounded ([blocks, n] compute type, n = R * chunk); strides chunk .. n/2 remain, a length-R transform
// across the R chunks at each offset r. One work item is 8 consecutive r of one n-block with all R chunks in
// registers. The stages run in increasing stride, each (lower, upper) -> (lower + upper, lower - upper), as the
// one-kernel plan's shuffles and shared-memory passes do, and scale / trailing signs / store are finish8's, so every
// output is the same tree of operations on the same values: the same bits.
template <int R, typename IO>
__global__ void __launch_bounds__(kMixThreads) high_stages_kernel(const Params<typename IO::C> p,
                                                                  const typename IO::C* t, int chunk) {
  using C = typename IO::C;
  const int rgroups = chunk / 8;
  const int64_t it = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (it >= p.blocks * rgroups) return;
  const int r0 = static_cast<int>(it % rgroups) * 8;
  const int64_t b = it / rgroups;
  const C* src = t + b * p.n + r0;
  C v[8][R];  // [offset j][chunk c]
#pragma unroll
  for (int c = 0; c < R; ++c) {
    C in[8];
    vload8<true>(src + static_cast<int64_t>(c) * chunk, in);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j][c] = in[j];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) radix<R>(v[j], R);
  typename IO::TO* y = static_cast<typename IO::TO*>(p.y) + b * p.n;
#pragma unroll
  for (int c = 0; c < R; ++c) {
    C out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = v[j][c];
    finish8<IO>(p, y, c * chunk + r0, 8, out);
  }
}

// The cluster plan (a power-of-two n-block in a call of few of them, sm_90): one launch, a thread-block cluster of
// kHighRadix blocks per n-block, each block one n/8-long chunk in its shared memory. Each block runs the one-kernel
// plan's low stages over its chunk, then, after the cluster barrier, the last three strides read the 8 chunks through
// distributed shared memory (high_stages_kernel's radix-8 across the chunks at each offset), each block finishing
// an eighth of the offsets, one per thread. The one-kernel plan walked R1's 4096-wide decode row in one thread block
// (4.6-4.8 us on the H200; the cluster: 3.2 us fp32 and bf16), the split plan used two launches and a scratch. Same
// operations on the same values as the other plans: the same bits. (A K > 1 variant, the K stage over the slices through distributed
// shared memory, gave the bits but took 30 us on R4's 1 x 14336 row against the split plan's 9.3: 28 remote reads per
// output. K > 1 keeps the split plan.)
namespace cg = cooperative_groups;
constexpr int kClusterThreads = 512;

template <typename IO>
__global__ void __launch_bounds__(kClusterThreads) fwht_cluster_kernel(const Params<typename IO::C> p, int part) {
  using C = typename IO::C;
  using T = typename IO::T;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  C* s = reinterpret_cast<C*>(smem_raw);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t b = blockIdx.x / kHighRadix;  // the n-block
  const T* x = static_cast<const T*>(p.x) + b * p.n + static_cast<int64_t>(rank) * part;
  typename IO::TO* y = static_cast<typename IO::TO*>(p.y) + b * p.n;

  low_stages<IO>(p, x, nullptr, s, part, rank * part, true);  // p.len == part: the chunk's own stages
  __syncthreads();
  smem_stages(s, part, p.len);
  cluster.sync();  // every slice's low stages are done, and every block has read its x (y may alias x)

  // One offset r of every chunk per thread, so the block's share (part / 8 offsets) spreads over part / 8 threads;
  // with 8 consecutive offsets per thread, R1's bf16 row had 8 threads a block convert and store 64 outputs each.
  const int share = part / kHighRadix;
  for (int r = rank * share + static_cast<int>(threadIdx.x); r < (rank + 1) * share;
       r += static_cast<int>(blockDim.x)) {
    C v[kHighRadix];  // [chunk c]
#pragma unroll
    for (int c = 0; c < kHighRadix; ++c) v[c] = cluster.map_shared_rank(s, c)[r];
    radix<kHighRadix>(v, kHighRadix);
#pragma unroll
    for (int c = 0; c < kHighRadix; ++c) finish1<IO>(p, y, c * part + r, v[c]);
  }

  cluster.sync();  // no block leaves while another still reads its shared memory
}

void check_launch(const char* site, cudaError_t e) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("[") + site + "] CUDA launch failed: " + cudaGetErrorString(e));
}

int smem_optin(const char* site) {
  int device = 0, bytes = 0;
  check_launch(site, cudaGetDevice(&device));
  check_launch(site, cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Lets the kernel use the device's whole opt-in shared memory, once per (kernel, device), not every call: after a
// warm-up, capturing the op in a CUDA graph makes no attribute call. Keyed by the kernel's address: every
// instantiation shares one function type, so a per-type flag would let the first kernel raised stand for all.
template <typename Kernel>
void raise_smem_limit(Kernel kernel, const char* site) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  check_launch(site, cudaGetDevice(&device));
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  check_launch(site, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin(site)));
  done.insert(key);
}

// n-blocks per tile: about kTileTarget elements, and a whole number of 8-element groups per tile (so groups never
// straddle two thread blocks and vector accesses stay aligned).
int64_t blocks_per_tile(int64_t n, int64_t blocks) {
  int64_t bpt = std::max<int64_t>(1, kTileTarget / n);
  int64_t g8 = 8;
  for (int64_t a = n, b = 8; b != 0;) {  // gcd(n, 8)
    const int64_t t = a % b;
    a = b, b = t, g8 = a;
  }
  const int64_t step = 8 / g8;
  bpt = (bpt + step - 1) / step * step;
  return std::min<int64_t>(bpt, std::max<int64_t>(step, blocks));
}

// Below this many tiles a K > 1 transform takes the split plan (a butterfly kernel into scratch, then the K stage
// over the whole grid): a batch-1 decode step's one 14336-wide row (K = 28) is one tile, and the one-kernel plan ran
// its 28 x 14336 K sums on a single SM. The split adds a launch and a scratch round trip through L2, which many
// tiles' thread blocks no longer repay.
constexpr int64_t kSplitBelowTiles = 64;

// A power-of-two (K = 1) n-block of at least kPow2SplitMin elements, in a call of at most kPow2SplitMaxBlocks
// n-blocks, takes the split plan too: the butterflies of its n / kHighRadix-long chunks (one thread block each) into
// scratch, then the last log2(kHighRadix) stages across the chunks over the grid. A QuaRot R1 decode row (1 x 4096)
// was one thread block of 256 threads. From 16 n-blocks on, the one-kernel plan already spreads over as many SMs
// and the split's second launch and scratch round trip are not repaid (an estimate: fwht_decode_cuda.py times both).
// Measured on the H200 (benchmarks/results/fwht-decode-h200-pow2split.json, 1 row): GPU time 4096 4.5 -> 4.3-5.1 us,
// 8192 7.1-7.5 -> 5.2, 16384 12.3-13.1 -> 5.8-6.0, 32768 25.3-26.6 -> 7.8-8.0 us; but the eager host cost of a call
// rises from ~15 to ~22 us (scratch allocation, second launch), so at batch-1 eager decode, which is host-bound,
// the split pays only where the one-kernel GPU time exceeds that: from 32768 on.
constexpr int64_t kPow2SplitMin = 32768;
constexpr int64_t kPow2SplitMaxBlocks = 8;

// The device's opt-in shared memory per block, read once per device (a decode step asks every call).
int smem_optin_cached(const char* site) {
  constexpr int kDevices = 64;
  static std::atomic<int> bytes[kDevices] = {};
  int device = 0;
  check_launch(site, cudaGetDevice(&device));
  if (device < 0 || device >= kDevices) return smem_optin(site);
  int b = bytes[device].load(std::memory_order_relaxed);
  if (b == 0) {
    b = smem_optin(site);
    bytes[device].store(b, std::memory_order_relaxed);
  }
  return b;
}

// The cluster plan (fwht_cluster_kernel) for a power-of-two n-block from kClusterPow2Min (below it the one-kernel
// plan's single block is as fast) in a call of at most kClusterMaxBlocks of them, fp32 compute (fp64's 8 x 8
// registers of the last stages would spill). A chunk must fit the default 48 KiB of shared memory, and the n-block
// the opt-in shared memory, so the plan never widens what the op accepts. FASTROUND_FWHT_CLUSTER=0 turns it off
// (read per call: a benchmark times both in one process).
constexpr int64_t kClusterMaxBlocks = 8;
constexpr int64_t kClusterPow2Min = 4096;

// Whether the cluster plan's largest launch (kClusterThreads threads and a 48 KiB chunk per block) can have a
// cluster of kHighRadix blocks resident on the current device.
bool cluster_launch_fits(const void* kernel) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kHighRadix, 1, 1);
  cfg.blockDim = dim3(kClusterThreads, 1, 1);
  cfg.dynamicSmemBytes = 48 * 1024;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kHighRadix;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters <= 0) {
    (void)cudaGetLastError();  // not sticky: clear it so the next launch does not report it
    return false;
  }
  return true;
}

// Whether the current device runs the cluster plan: compute capability 9.0 and up, and room for a cluster of 8
// blocks (a MIG partition narrower than a GPC may have none). Asked once per device, the answer cached.
bool clusters_available(const char* site) {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  check_launch(site, cudaGetDevice(&device));
  int v = device >= 0 && device < kDevices ? known[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int major = 0;
    check_launch(site, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    const bool fits = major >= 9 && cluster_launch_fits(reinterpret_cast<const void*>(fwht_cluster_kernel<F32>)) &&
                      cluster_launch_fits(reinterpret_cast<const void*>(fwht_cluster_kernel<F16>)) &&
                      cluster_launch_fits(reinterpret_cast<const void*>(fwht_cluster_kernel<BF16>));
    v = fits ? 2 : 1;
    if (device >= 0 && device < kDevices) known[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

// Whether this call takes the cluster plan.
bool takes_cluster(int64_t rows, int64_t cols, const FwhtSpec& spec, int64_t compute_bytes, const char* site) {
  const int64_t blocks = rows * (cols / spec.n);
  if (compute_bytes != 4 || blocks <= 0 || blocks > kClusterMaxBlocks) return false;
  if (spec.k != 1 || !is_pow2(spec.n) || spec.n < kClusterPow2Min) return false;
  if (spec.n / kHighRadix * compute_bytes > 48 * 1024 || spec.n * compute_bytes > smem_optin_cached(site)) return false;
  const char* env = std::getenv("FASTROUND_FWHT_CLUSTER");
  if (env && env[0] == '0' && env[1] == '\0') return false;
  return clusters_available(site);
}

// Which kernels run a call: the cluster plan where it applies, else the split plan where it applies and a scratch
// is at hand (have_scratch; fwht_cuda_scratch_bytes asks as if it were), else one fwht_kernel launch over tiles.
// Decided once per call: the conditions read the environment and per-device caches on the decode hot path.
// compute_bytes: sizeof the compute type (4, or 8 for F64).
enum class Plan { Tiles, Split, Cluster };

Plan plan_for(int64_t rows, int64_t cols, const FwhtSpec& spec, int64_t compute_bytes, bool have_scratch,
              const char* site) {
  if (takes_cluster(rows, cols, spec, compute_bytes, site)) return Plan::Cluster;
  if (!have_scratch) return Plan::Tiles;
  const int64_t blocks = rows * (cols / spec.n);
  if (spec.k == 1) {
    // Only where the one-kernel plan runs too (its n-block fits the shared memory): the split must not widen what
    // the op accepts, or a 1-row call would pass where the same n with more rows is refused.
    const bool split = is_pow2(spec.n) && spec.n >= kPow2SplitMin && blocks <= kPow2SplitMaxBlocks &&
                       spec.n * compute_bytes <= smem_optin_cached(site);
    return split ? Plan::Split : Plan::Tiles;
  }
  const int64_t len = spec.n / spec.k;
  if (len % 8 != 0) return Plan::Tiles;
  const int64_t bpt = blocks_per_tile(spec.n, blocks);
  return (blocks + bpt - 1) / bpt < kSplitBelowTiles ? Plan::Split : Plan::Tiles;
}

template <typename IO>
Params<typename IO::C> make_params(const void* x, void* y, int64_t rows, int64_t cols, const FwhtSpec& spec) {
  using C = typename IO::C;
  Params<C> p{};
  p.x = x;
  p.y = y;
  p.n = static_cast<int>(spec.n);
  p.sign_n = p.n;
  p.k = static_cast<int>(spec.k);
  p.len = static_cast<int>(spec.n / spec.k);
  p.blocks = rows * (cols / spec.n);
  p.hadk = spec.k > 1 ? spec.hadk : nullptr;
  p.signs = spec.signs;
  p.transpose = spec.transpose;
  p.signs_first = spec.signs_first;
  p.normalize = spec.normalize;
  p.c = spec.normalize ? fwht_scale<C>(spec.n) : C(1);
  p.vec = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(y) % 16 == 0);
  return p;
}

// One fwht_kernel launch over p (its tiles of p.bpt n-blocks, each thread block one tile). max_bpt > 0 caps the
// n-blocks per tile (the K = 1 split plan: one chunk per thread block; its chunks are multiples of 8 long, so a tile
// still holds whole 8-element groups).
template <typename IO>
void launch_tiles(Params<typename IO::C> p, void* stream, const char* site, int64_t max_bpt = 0) {
  using C = typename IO::C;
  int64_t bpt = blocks_per_tile(p.n, p.blocks);
  if (max_bpt > 0) bpt = std::min(bpt, max_bpt);
  p.bpt = static_cast<int>(bpt);
  const int64_t tile = bpt * p.n;
  const bool through_smem = p.k > 1 || p.len > 2 * kShuffleTop;
  const int64_t smem = through_smem ? tile * static_cast<int64_t>(sizeof(C)) : 0;
  if (smem > 48 * 1024) {
    const int optin = smem_optin(site);
    if (smem > optin)
      throw OptionError(std::string("[") + site + "] block_size: " + std::to_string(p.n) +
                        " is too large for the CUDA kernel (its tile needs " + std::to_string(smem) +
                        " bytes of shared memory, the device gives " + std::to_string(optin) + ")");
  }
  const int64_t grid = (p.blocks + bpt - 1) / bpt;
  if (grid > 0x7FFFFFFF) throw OptionError(std::string("[") + site + "] x: too many blocks for one launch");
  const int64_t groups = (tile + 7) / 8;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (groups + 31) / 32 * 32));
  const bool blocked = p.k > 1 && p.len % 8 == 0;
  const int kb = !blocked ? 0 : p.k % 8 == 0 ? 8 : p.k % 4 == 0 ? 4 : p.k % 2 == 0 ? 2 : 1;
  auto run = [&](auto kernel) {
    if (smem > 48 * 1024) raise_smem_limit(kernel, site);
    kernel<<<static_cast<unsigned>(grid), threads, static_cast<size_t>(smem), static_cast<cudaStream_t>(stream)>>>(p);
    check_launch(site, cudaGetLastError());
  };
  switch (kb) {
    case 8: return run(fwht_kernel<IO, 8>);
    case 4: return run(fwht_kernel<IO, 4>);
    case 2: return run(fwht_kernel<IO, 2>);
    case 1: return run(fwht_kernel<IO, 1>);
    default: return run(fwht_kernel<IO, 0>);
  }
}

// The K = 1 split plan's second kernel over the butterfly pass's scratch t (chunks of `chunk` = n / kHighRadix).
template <typename IO>
void launch_high_stages(const Params<typename IO::C>& p, int chunk, const typename IO::C* t, void* stream,
                        const char* site) {
  const int64_t items = p.blocks * (chunk / 8);
  const int64_t grid = (items + kMixThreads - 1) / kMixThreads;
  if (grid > 0x7FFFFFFF) throw OptionError(std::string("[") + site + "] x: too many blocks for one launch");
  Params<typename IO::C> pb = p;
  pb.vec = reinterpret_cast<uintptr_t>(p.y) % 16 == 0;  // the scratch is read as 16-byte vectors (aligned)
  high_stages_kernel<kHighRadix, IO><<<static_cast<unsigned>(grid), kMixThreads, 0,
                                       static_cast<cudaStream_t>(stream)>>>(pb, t, chunk);
  check_launch(site, cudaGetLastError());
}

// The split plan (plan_for): the butterflies of every seg-long segment with the leading signs into `scratch`
// ([blocks, n] compute type, unrounded, unscaled), then the rest, scale, trailing signs and store: for K > 1
// (seg = len) kmix_kernel's K stage; for K = 1 (seg = n / kHighRadix) high_stages_kernel's last stages.
template <typename IO>
void launch_split(const Params<typename IO::C>& p, void* scratch, void* stream, const char* site) {
  using C = typename IO::C;
  const bool pow2 = p.k == 1;
  const int seg = pow2 ? p.n / kHighRadix : p.len;
  Params<C> pa = p;
  pa.y = scratch;
  pa.n = seg;
  pa.len = seg;
  pa.k = 1;
  pa.hadk = nullptr;
  pa.blocks = p.blocks * (p.n / seg);
  pa.signs = p.signs_first ? p.signs : nullptr;
  pa.normalize = false;
  pa.c = C(1);
  pa.vec = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (reinterpret_cast<uintptr_t>(scratch) % 16 == 0);
  launch_tiles<ToCompute<IO>>(pa, stream, site, pow2 ? 1 : 0);
  if (pow2) return launch_high_stages<IO>(p, seg, static_cast<const C*>(scratch), stream, site);

  const int64_t rgroups = p.len / 8;
  // Widest register block that still leaves ~2048 work items (a batch-1 R4 row: KB = 1, 1792 items, 14 blocks).
  int kb = 1;
  for (int cand : {4, 2}) {
    if (p.k % cand == 0 && p.blocks * (p.k / cand) * rgroups >= 2048) {
      kb = cand;
      break;
    }
  }
  const int64_t items = p.blocks * (p.k / kb) * rgroups;
  const int64_t grid = (items + kMixThreads - 1) / kMixThreads;
  if (grid > 0x7FFFFFFF) throw OptionError(std::string("[") + site + "] x: too many blocks for one launch");
  Params<C> pb = p;
  pb.vec = reinterpret_cast<uintptr_t>(p.y) % 16 == 0;  // kmix reads the scratch as 16-byte vectors (aligned)
  const C* t = static_cast<const C*>(scratch);
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(grid), kMixThreads, 0, static_cast<cudaStream_t>(stream)>>>(pb, t);
    check_launch(site, cudaGetLastError());
  };
  switch (kb) {
    case 4: return run(kmix_kernel<4, IO>);
    case 2: return run(kmix_kernel<2, IO>);
    default: return run(kmix_kernel<1, IO>);
  }
}

// The cluster plan: one cluster of kHighRadix blocks per n-block, each block one chunk of n / kHighRadix elements.
template <typename IO>
void launch_cluster(Params<typename IO::C> p, void* stream, const char* site) {
  using C = typename IO::C;
  const int part = p.n / kHighRadix;
  p.len = part;  // the low stages run within each chunk; the last three strides cross them
  p.bpt = 1;
  const int threads = static_cast<int>(std::min<int64_t>(kClusterThreads, (part / 8 + 31) / 32 * 32));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.blocks * kHighRadix), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(part) * sizeof(C);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(kHighRadix);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check_launch(site, cudaLaunchKernelEx(&cfg, fwht_cluster_kernel<IO>, p, part));
}

template <typename IO>
void launch(const void* x, void* y, int64_t rows, int64_t cols, const FwhtSpec& spec, void* stream, void* scratch,
            const char* site) {
  const Params<typename IO::C> p = make_params<IO>(x, y, rows, cols, spec);
  const Plan plan = plan_for(rows, cols, spec, sizeof(typename IO::C), scratch != nullptr, site);
  if constexpr (sizeof(typename IO::C) == 4) {  // no fp64 instantiation: takes_cluster refuses fp64 compute
    if (plan == Plan::Cluster) return launch_cluster<IO>(p, stream, site);
  }
  if (plan == Plan::Split) return launch_split<IO>(p, scratch, stream, site);
  launch_tiles<IO>(p, stream, site);
}

}  // namespace

int64_t fwht_cuda_max_block(DType dtype) {
  const int64_t bytes = smem_optin("fwht_cuda_max_block");
  return bytes / (dtype == DType::F64 ? 8 : 4);
}

int64_t fwht_cuda_scratch_bytes(DType dtype, int64_t rows, int64_t cols, const FwhtSpec& spec) {
  if (rows <= 0 || cols <= 0 || spec.n <= 0 || spec.k <= 0 || cols % spec.n != 0 || spec.n % spec.k != 0) return 0;
  if (plan_for(rows, cols, spec, dtype == DType::F64 ? 8 : 4, true, "fwht_cuda_scratch_bytes") != Plan::Split) return 0;
  return rows * cols * (dtype == DType::F64 ? 8 : 4);
}

void fwht_rows_cuda(DType dtype, const void* x, void* y, int64_t rows, int64_t cols, const FwhtSpec& spec,
                    void* stream, const char* site, void* scratch) {
  const std::string at = std::string("[") + site + "] ";
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::F16 && dtype != DType::BF16)
    throw OptionError(at + "x: dtype must be F32, F64, F16 or BF16, got " + std::string(dtype_name(dtype)));
  if (rows < 0 || cols < 0) throw OptionError(at + "x: negative shape");
  if (rows * cols > 0 && (!x || !y)) throw OptionError(at + "x: null data");
  if (spec.n <= 0) throw OptionError(at + "block_size: must be positive, got " + std::to_string(spec.n));
  if (cols % spec.n != 0)
    throw OptionError(at + "block_size: " + std::to_string(spec.n) + " does not divide the last dimension " +
                      std::to_string(cols));
  if (spec.k <= 0 || spec.n % spec.k != 0 || !is_pow2(spec.n / spec.k))
    throw OptionError(at + "hadamard_k: order " + std::to_string(spec.k) + " does not split block_size " +
                      std::to_string(spec.n) + " as K * 2^m");
  if (spec.k > 1 && !spec.hadk)
    throw OptionError(at + "hadamard_k: a " + std::to_string(spec.k) + "x" + std::to_string(spec.k) +
                      " matrix is required");
  if (spec.n > (int64_t(1) << 30)) throw OptionError(at + "block_size: too large");
  if (rows * cols == 0) return;
  switch (dtype) {
    case DType::F32: return launch<F32>(x, y, rows, cols, spec, stream, scratch, site);
    case DType::F64: return launch<F64>(x, y, rows, cols, spec, stream, scratch, site);
    case DType::F16: return launch<F16>(x, y, rows, cols, spec, stream, scratch, site);
    default: return launch<BF16>(x, y, rows, cols, spec, stream, scratch, site);
  }
}

}  // namespace fastround::transform::gpu
