// Weight-only-quantized linear on CUDA (woq_cuda.h): a GEMV for batches of 1..8 that reads the packed weight once,
// and a dequantize kernel for larger batches, whose bf16/fp16 result a cuBLAS matmul then consumes.
//
// The GEMV is bound by memory bandwidth at batch 1 only if dequantizing costs a few instructions per weight. A
// code q of b bits sitting at bit offset b*t (< 16) of a 16-bit half of a word becomes a float with one LOP3 and
// one FADD: (word & mask_t) | 0x4B000000 is the fp32 2^23 + q*2^(b*t) exactly, minus 2^23 leaves q*2^(b*t). The
// factor 2^(b*t) is folded into the activation (gptq: t follows the input k) or into the scale (awq: t follows the
// output column), both exact powers of two. Per group, each thread accumulates sum(q*x) and sum(x) in fp32 and
// applies the group's scale and zero once: s*(sum(q*x) - z*sum(x)). Inputs are split over the block's threads and,
// when the column tiles alone leave SMs idle, over the blocks of a thread-block cluster (sm_90) whose partial sums
// meet in distributed shared memory: one launch, no workspace, no atomics, the same sums in the same order on
// every run.
#include "fastround/infer/woq_cuda.h"
#include "fastround/infer/woq_cuda_plan.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/transform/fwht_butterfly.cuh"
#include "fastround/tune/cuda_elements.cuh"

namespace fastround::infer::gpu {

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = kStagedThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kBatch = 8;     // default word rows a thread has in flight before it uses any
constexpr int kMaxSplit = 8;  // blocks per cluster along the inputs (the portable cluster size)
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr uint32_t kMagic = 0x4B000000u;  // fp32 2^23: its mantissa holds an integer < 2^23 exactly
constexpr float kMagicF = 8388608.0f;

// GPTQ GEMV: 8 threads cover 128 contiguous bytes of a qweight row (32 output columns, 4 per thread).
constexpr int kGptqTx = 8;
constexpr int kGptqCols = 4 * kGptqTx;
// AWQ GEMV: a thread loads WORDS words of a qweight row (8*WORDS output columns); 16/WORDS threads cover 64
// contiguous bytes, a tile of 128 columns. Every column a thread owns holds two fp32 sums per batch row plus its
// scale and zero in registers, so WORDS is 2 (64-bit loads) up to batch 2 and 1 beyond: 128-bit loads (WORDS 4)
// took 206 registers at batch 1, one block per SM.
constexpr int kAwqCols = 128;

template <DType D>
struct DTag {
  static constexpr DType value = D;
};

// ---- element conversions ----
// Single elements (bias, outputs, the dequantize path) go through tune/cuda_elements.cuh, which rounds as the CPU
// kernels do; the GEMV's inner loops convert whole words of x and scales with the hardware conversions below
// (exact either way: fp16 and bf16 widen to fp32 without rounding).
using tune::cuda::load_el;
using tune::cuda::store_el;

// The two 16-bit values of a word: element 2i in the low half (little endian), as floats.
template <DType D>
__device__ __forceinline__ float lo_f32(uint32_t w) {
  if constexpr (D == DType::BF16) return __uint_as_float(w << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
}
template <DType D>
__device__ __forceinline__ float hi_f32(uint32_t w) {
  if constexpr (D == DType::BF16) return __uint_as_float(w & 0xFFFF0000u);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// The packed weight is read once: keep it out of L1 so activations and scales stay there.
__device__ __forceinline__ uint4 load_stream(const int32_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// q * 2^(BITS*t) for the code at lane t of the low 16 bits of `half_word`.
template <int BITS, int T>
__device__ __forceinline__ float code_scaled(uint32_t half_word) {
  constexpr uint32_t kMask = ((1u << BITS) - 1u) << (BITS * T);
  static_assert(BITS * (T + 1) <= 16, "a lane must sit in the low 16 bits");
  return __uint_as_float((half_word & kMask) | kMagic) - kMagicF;
}

// 2^-e, exact (e < 32).
__host__ __device__ constexpr float inv_pow2(int e) { return 1.0f / static_cast<float>(1u << e); }

// AWQ: output column (within a run of 8) of nibble slot s; the inverse of pack_awq.h's kAwqOrder.
__host__ __device__ constexpr int awq_slot_column(int s) { return 2 * (s & 3) + (s >> 2); }

// ---- the GEMV's shared tail: block and cluster reduction, bias, store ----

struct GemvArgs {
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  const void* x;     // [m, in]
  const void* bias;  // [out] in x's dtype or fp32 (bias_f32), or null
  void* out;         // [m, out]
  int64_t in, out_features, group;
  int64_t rows;      // qweight rows: gptq in*bits/32, awq in
  int64_t zwords;    // qzeros row length in words
  int m;
  int split;         // blocks of a cluster sharing one column tile's inputs
  bool bias_f32;
  float zero_add;    // added to stored zero points: 1 for GPTQ v1, else 0
  // x's online rotation, applied by the staged kernel's ROTATE instantiation as it stages x (WoqInputHadamard):
  // the block size (a power of two), the sign vector [rot_n] or null, and 1/sqrt(rot_n) as fwht_cuda.cu rounds it
  int rot_n;
  const int8_t* rot_signs;
  bool rot_signs_first;
  float rot_scale;
};

// The block's sums of part [kWarps][MT * CT] (every warp's share written, batch row-major over the CT-column tile),
// then the cluster's: the blocks of a cluster meet through distributed shared memory; each output is then written
// once, bias added, in x's dtype. Every thread of the block calls it.
template <int MT, int CT, DType XT>
__device__ __forceinline__ void block_store(float (&part)[kWarps][MT * CT], const GemvArgs& a) {
  constexpr int E = MT * CT;
  __shared__ float red[E];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += part[w][e];
    red[e] = s;
  }
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * CT;
  auto store = [&](int e, float s) {
    const int m = e / CT;
    const int64_t n = col0 + e % CT;
    if (m >= a.m || n >= a.out_features) return;
    if (a.bias) s += a.bias_f32 ? static_cast<const float*>(a.bias)[n] : load_el<XT>(a.bias, n);
    store_el<XT>(a.out, m * a.out_features + n, s);
  };
  if (a.split == 1) {
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += kThreads) store(e, red[e]);
    return;
  }
  // Every block of the cluster sums a share of the tile from all blocks' `red`, in rank order.
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  for (int e = rank * kThreads + threadIdx.x; e < E; e += a.split * kThreads) {
    float s = 0.0f;
    for (int r = 0; r < a.split; ++r) s += cluster.map_shared_rank(red, r)[e];
    store(e, s);
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
}

// acc [MT][CPT] holds this thread's sums for columns tx*CPT .. tx*CPT+CPT-1 of the block's CT-column tile.
// Lanes of a warp with the same tx meet through shuffles, then warps and blocks in block_store.
template <int MT, int CPT, int TX, DType XT>
__device__ __forceinline__ void reduce_store(float (&acc)[MT][CPT], const GemvArgs& a) {
  constexpr int CT = CPT * TX;
  constexpr int E = MT * CT;
  __shared__ float part[kWarps][E];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tx = threadIdx.x % TX;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      float v = acc[m][c];
#pragma unroll
      for (int off = TX; off < 32; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
      acc[m][c] = v;
    }
  if (lane < TX) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < CPT; ++c) part[warp][m * CT + tx * CPT + c] = acc[m][c];
  }
  block_store<MT, CT, XT>(part, a);
}

// The rows [r0, r1) of qweight this thread walks: blockIdx.y's share of the inputs, then this thread's slice.
template <int TX>
__device__ __forceinline__ void thread_rows(const GemvArgs& a, int64_t& r0, int64_t& r1) {
  constexpr int TY = kThreads / TX;
  const int64_t per_split = (a.rows + a.split - 1) / a.split;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * per_split, s1 = min(a.rows, s0 + per_split);
  const int64_t per_thread = (max(s1 - s0, int64_t{0}) + TY - 1) / TY;
  const int ty = threadIdx.x / TX;
  r0 = s0 + ty * per_thread;
  r1 = min(s1, r0 + per_thread);
}

// ---- GPTQ words: a lane's 4 consecutive output columns n0 .. n0+3 ----
// Shared by the rows and the staged kernel: the group's scales and zero points, and one qweight row's codes.

// A group's 4 scales and the qzeros word holding the 4 zero points, as loaded: kept raw so that nothing waits on
// the loads before the values are used.
struct GroupRaw {
  uint2 scales;
  uint32_t zeros;
};

template <int BITS>
__device__ __forceinline__ GroupRaw load_group_raw(const GemvArgs& a, int64_t g, int64_t n0) {
  constexpr int PF = 32 / BITS;
  GroupRaw r;
  r.scales = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(a.scales) + g * a.out_features + n0));
  r.zeros = static_cast<uint32_t>(__ldg(a.qzeros + g * a.zwords + n0 / PF));
  return r;
}

// The 4 columns' scales and zero points (the stored zero plus zero_add) as floats.
template <int BITS, DType ST>
__device__ __forceinline__ void unpack_group(const GroupRaw& r, int64_t n0, float zero_add, float (&sc)[4],
                                             float (&zc)[4]) {
  constexpr int PF = 32 / BITS;
  constexpr uint32_t kCodeMask = (1u << BITS) - 1u;
  sc[0] = lo_f32<ST>(r.scales.x);
  sc[1] = hi_f32<ST>(r.scales.x);
  sc[2] = lo_f32<ST>(r.scales.y);
  sc[3] = hi_f32<ST>(r.scales.y);
  const uint32_t zw = r.zeros >> (BITS * (n0 % PF));
#pragma unroll
  for (int c = 0; c < 4; ++c) zc[c] = static_cast<float>((zw >> (BITS * c)) & kCodeMask) + zero_add;
}

// One 16-byte qweight load (4 columns x PF inputs) as v[c][j] = q * 2^(BITS*t) for input j (code_scaled).
template <int BITS>
__device__ __forceinline__ void dequant_row4(const uint4& q, float (&v)[4][32 / BITS]) {
  constexpr int LANES = 16 / BITS;  // codes per 16-bit half
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t halves[2] = {words[c], words[c] >> 16};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      v[c][h * LANES + 0] = code_scaled<BITS, 0>(halves[h]);
      if constexpr (LANES > 1) v[c][h * LANES + 1] = code_scaled<BITS, 1>(halves[h]);
      if constexpr (LANES > 2) {
        v[c][h * LANES + 2] = code_scaled<BITS, 2>(halves[h]);
        v[c][h * LANES + 3] = code_scaled<BITS, 3>(halves[h]);
      }
      if constexpr (LANES > 4) {
        v[c][h * LANES + 4] = code_scaled<BITS, 4>(halves[h]);
        v[c][h * LANES + 5] = code_scaled<BITS, 5>(halves[h]);
        v[c][h * LANES + 6] = code_scaled<BITS, 6>(halves[h]);
        v[c][h * LANES + 7] = code_scaled<BITS, 7>(halves[h]);
      }
    }
  }
}

// ---- GEMV, GPTQ layout ----
// Thread tile: one 16-byte load = 4 consecutive output columns x PF inputs (one qweight row).

// Batch 1 at 4 and 8 bits, U loads in flight per thread (sm_90, no spills): U 8 fits 80 registers, 3 blocks per SM
// instead of 2; U 2 and 4 fit 64, 4 blocks; U 16 takes 120, 2 blocks.
template <int BITS, int MT, int U, DType XT, DType ST>
__global__ void __launch_bounds__(kThreads, MT == 1 && BITS >= 4 ? (U <= 4 ? 4 : U <= 8 ? 3 : 2) : 1)
    gemv_gptq_kernel(GemvArgs a) {
  constexpr int PF = 32 / BITS;        // inputs per word
  constexpr int LANES = 16 / BITS;     // codes per 16-bit half
  const int tx = threadIdx.x % kGptqTx;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGptqCols + tx * 4;
  const bool active = n0 < a.out_features;  // out % 4 == 0: a thread's 4 columns are all in or all out
  int64_t r, r1;
  thread_rows<kGptqTx>(a, r, r1);
  if (!active) r1 = r;

  float acc[MT][4] = {};
  float accg[MT][4] = {};  // this group's sum(q * x) per row and column
  float sx[MT] = {};       // this group's sum(x) per row
  float sc[4] = {}, zc[4] = {};
  const int64_t words_per_group = a.group / PF;
  int64_t g_end = r;  // first row past the current group: the first row loads its group
  auto flush = [&]() {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        acc[m][c] = fmaf(sc[c], fmaf(-zc[c], sx[m], accg[m][c]), acc[m][c]);
        accg[m][c] = 0.0f;
      }
      sx[m] = 0.0f;
    }
  };
  auto load_group = [&](int64_t row) {
    const int64_t g = row / words_per_group;
    g_end = (g + 1) * words_per_group;
    unpack_group<BITS, ST>(load_group_raw<BITS>(a, g, n0), n0, a.zero_add, sc, zc);
  };

  // Running pointers: qweight row r at this thread's columns, x[0, r*PF]; rows of x are `in` apart.
  const int32_t* qp = a.qweight + r * a.out_features + n0;
  const uint16_t* xr = static_cast<const uint16_t*>(a.x) + r * PF;
  const int in32 = static_cast<int>(a.in);
  for (; r < r1; r += U) {
    uint4 q[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      q[u] = r + u < r1 ? load_stream(qp) : make_uint4(0, 0, 0, 0);
      qp += a.out_features;
    }
#pragma unroll
    for (int u = 0; u < U; ++u, xr += PF) {
      const int64_t row = r + u;
      if (row >= r1) break;
      if (row >= g_end) {
        flush();
        load_group(row);
      }
      // The 4 columns' codes times 2^(BITS*t): v[c][j] for input row*PF + j.
      float v[4][PF];
      dequant_row4<BITS>(q[u], v);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.m) break;
        // x[m, row*PF .. row*PF+PF): PF 16-bit values, 16-byte aligned for PF >= 8 (8-byte for PF 4).
        const uint16_t* xp = xr + m * in32;
        uint32_t xw[PF / 2];
        if constexpr (PF == 4) {
          const uint2 t = __ldg(reinterpret_cast<const uint2*>(xp));
          xw[0] = t.x;
          xw[1] = t.y;
        } else {
#pragma unroll
          for (int i = 0; i < PF / 8; ++i) {
            const uint4 t = __ldg(reinterpret_cast<const uint4*>(xp) + i);
            xw[4 * i + 0] = t.x;
            xw[4 * i + 1] = t.y;
            xw[4 * i + 2] = t.z;
            xw[4 * i + 3] = t.w;
          }
        }
        float xf[PF];
#pragma unroll
        for (int i = 0; i < PF / 2; ++i) {
          xf[2 * i] = lo_f32<XT>(xw[i]);
          xf[2 * i + 1] = hi_f32<XT>(xw[i]);
        }
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < PF; ++j) s += xf[j];
        sx[m] += s;
        // Undo the lane factor 2^(BITS*t) on the activation, shared by the 4 columns.
#pragma unroll
        for (int j = 0; j < PF; ++j) xf[j] *= inv_pow2(BITS * (j % LANES));
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int j = 0; j < PF; ++j) accg[m][c] = fmaf(v[c][j], xf[j], accg[m][c]);
      }
    }
  }
  flush();
  reduce_store<MT, 4, kGptqTx, XT>(acc, a);
}

// ---- the staged kernel's half2 variant (4 bits, batch 1; FASTROUND_WOQ_CUDA_VARIANT=half2) ----
// The fp32 path above spends a mask, an FADD and an FMA per code. Here x's own 16-bit arithmetic takes two codes
// per instruction: a mask puts the codes of inputs j and j+4 (nibble j of each half of a word) into the mantissas
// of a half2 whose exponent makes one unit of the mantissa one unit of q, so the pair reads (B + q, B + q') exactly
// (fp16: B = 1024 with the code at bit 0, or 1024 + 16q at bit 4; bf16, 7 mantissa bits: B = 128, the word shifted
// so the code sits at bit 0); one HFMA2 turns it into the exact pair ((q - z)/16, (q' - z)/16), four HFMA2 take the
// word's 8 products with the staged pairs (x_j, x_{j+4}), and the two lanes, 4 products each, join the fp32 sum.
// The 1/16 keeps |(q - z) x| within |x|, so that fp16 products overflow no sooner than x itself (a lane's 4-term sum
// only once the 4 inputs' |x| add up past 65504); the fold multiplies the 16 back (exact).
// Rounding: each product and the 4-term sums round to x's dtype before the fp32 sum, within the GPU checks'
// tolerance of the fp32 path (2e-3 fp16, 1.6e-2 bf16, relative to the largest output).

template <DType XT>
using Half2Of = std::conditional_t<XT == DType::F16, __half2, __nv_bfloat162>;

template <DType XT>
__device__ __forceinline__ Half2Of<XT> half2_bits(uint32_t u) {
  Half2Of<XT> h;
  memcpy(&h, &u, 4);
  return h;
}

// The additive constants of word_dot_half2 for a column with zero point z: with them the HFMA2 yields (q - z) / 16,
// exact (|q - z| <= 16 and the constants are representable: 64 + z/16 and 4 + z/16 in fp16, 8 + z/16 in bf16).
// Subtracting z before the products keeps their rounding relative to the result, not to sum(q * x).
template <DType XT>
__device__ __forceinline__ void half2_zero_terms(float z, Half2Of<XT>& b0, Half2Of<XT>& b1) {
  if constexpr (XT == DType::F16) {
    b0 = __float2half2_rn(-(64.0f + z * 0.0625f));
    b1 = __float2half2_rn(-(4.0f + z * 0.0625f));
  } else {
    b0 = __float2bfloat162_rn(-(8.0f + z * 0.0625f));
    b1 = b0;
  }
}

// sum over the word's 8 inputs of (q - z) / 16 * x, x's pairs (x_j, x_{j+4}) in xp; b0, b1 from half2_zero_terms.
template <DType XT>
__device__ __forceinline__ float word_dot_half2(uint32_t w, const uint4& xp, Half2Of<XT> b0, Half2Of<XT> b1) {
  static_assert(XT == DType::F16 || XT == DType::BF16, "x is fp16 or bf16");
  using H2 = Half2Of<XT>;
  constexpr uint32_t kLow = 0x000F000Fu;  // nibble 0 of each half
  H2 d[4];                                // (q_j - z, q_{j+4} - z) / 16 for j = 0..3
  if constexpr (XT == DType::F16) {
    constexpr uint32_t kB = 0x64006400u;             // 1024: one mantissa unit is 1
    const H2 s0 = half2_bits<XT>(0x2C002C00u);       // 1/16:  (1024 + q) / 16 - 64 - z/16 = (q - z) / 16
    const H2 s1 = half2_bits<XT>(0x1C001C00u);       // 1/256: (1024 + 16q) / 256 - 4 - z/16 = (q - z) / 16
    const uint32_t w8 = w >> 8;
    d[0] = __hfma2(half2_bits<XT>((w & kLow) | kB), s0, b0);
    d[1] = __hfma2(half2_bits<XT>((w & (kLow << 4)) | kB), s1, b1);
    d[2] = __hfma2(half2_bits<XT>((w8 & kLow) | kB), s0, b0);
    d[3] = __hfma2(half2_bits<XT>((w8 & (kLow << 4)) | kB), s1, b1);
  } else {
    constexpr uint32_t kB = 0x43004300u;        // 128: one mantissa unit is 1
    const H2 s0 = half2_bits<XT>(0x3D803D80u);  // 1/16: (128 + q) / 16 - 8 - z/16 = (q - z) / 16
#pragma unroll
    for (int j = 0; j < 4; ++j) d[j] = __hfma2(half2_bits<XT>(((w >> (4 * j)) & kLow) | kB), s0, b0);
  }
  H2 acc = __hmul2(d[0], half2_bits<XT>(xp.x));
  acc = __hfma2(d[1], half2_bits<XT>(xp.y), acc);
  acc = __hfma2(d[2], half2_bits<XT>(xp.z), acc);
  acc = __hfma2(d[3], half2_bits<XT>(xp.w), acc);
  float2 f;
  if constexpr (XT == DType::F16) f = __half22float2(acc);
  else f = __bfloat1622float2(acc);
  return f.x + f.y;
}

// ---- GEMV, GPTQ words, activations staged in shared memory ("staged") ----

// One qweight row's PF inputs of x (16-byte aligned) as PF/2 words of x's dtype, element 2i in the low half.
template <int PF>
__device__ __forceinline__ void load_x_words(const uint16_t* xp, uint32_t (&xw)[PF / 2]) {
  if constexpr (PF == 4) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(xp));
    xw[0] = t.x;
    xw[1] = t.y;
  } else {
    const uint4 t = __ldg(reinterpret_cast<const uint4*>(xp));
    xw[0] = t.x;
    xw[1] = t.y;
    xw[2] = t.z;
    xw[3] = t.w;
  }
}

// Inputs k0 .. k0+7 of one x row, in place: the rotation's leading signs, the Sylvester butterflies of its
// rot_n-blocks, the scale, the trailing signs and the rounding to x's dtype, each as fwht_cuda.cu's one-kernel plan
// does them (the same helpers, F16 / BF16 widening and narrowing), so the words are the bits hadamard_transform
// writes. Consecutive lanes must hold consecutive groups of 8 inputs, and every lane of the warp must call it.
template <DType XT>
__device__ __forceinline__ void rotate_x_words(const GemvArgs& a, int k0, int lane, uint32_t (&xw)[4]) {
  namespace tg = fastround::transform::gpu;
  auto widen = [](uint32_t h) {
    return XT == DType::BF16 ? bf16_to_float(static_cast<uint16_t>(h)) : fp16_to_float(static_cast<uint16_t>(h));
  };
  auto narrow = [](float f) -> uint32_t { return XT == DType::BF16 ? float_to_bf16(f) : float_to_fp16(f); };
  float v[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = widen(xw[i] & 0xFFFFu);
    v[2 * i + 1] = widen(xw[i] >> 16);
  }
  const int sign_mask = a.rot_n - 1;  // rot_n divides the row and k0 counts from the row's start
  if (a.rot_signs && a.rot_signs_first) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = tg::apply_sign(v[j], __ldg(a.rot_signs + ((k0 + j) & sign_mask)));
  }
  tg::radix<8>(v, a.rot_n);
  tg::shuffle_stages(v, a.rot_n, lane);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = tg::rmul(v[j], a.rot_scale);
  if (a.rot_signs && !a.rot_signs_first) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = tg::apply_sign(v[j], __ldg(a.rot_signs + ((k0 + j) & sign_mask)));
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) xw[i] = narrow(v[2 * i]) | (narrow(v[2 * i + 1]) << 16);
}

// Blocks per SM the staged kernel is compiled for: register caps that hold its loads without spills (ptxas -v).
template <int U, bool PREFETCH>
constexpr int staged_min_blocks(int mt) {
  constexpr int live = PREFETCH ? 2 * U : U;  // 16-byte loads a thread holds
  return mt == 1 ? (live <= 4 ? 4 : live <= 8 ? 3 : 2) : mt <= 4 ? 2 : 1;
}

// The per-thread-rows kernel above gives each thread a long private run of rows, so a block's first loads wait on
// scales and x and only a few 16-byte loads per thread are ever in flight. Here a lane owns 4 columns (one 16-byte
// qweight load per row) and a row worker (TX lanes, TX*4 contiguous columns) takes CHUNKS of U consecutive qweight
// rows, all U loads issued before any is used; a chunk never straddles a group (group % (U*PF) == 0), so the scale
// and zero are loaded once per chunk and applied once: s * (sum(q*x) - z * sum(x)). blockIdx.y owns a contiguous
// share of the chunks, whose activations the block converts once into shared memory as fp32, pre-multiplied by the
// lane factor 2^-(BITS*t) of code_scaled, next to each qweight row's plain sum of x; the qweight loads of the first
// chunk are issued before that staging so its latency hides theirs. Worker sums meet in reduce_store (cluster
// split-K over blockIdx.y), in a fixed order: deterministic.
// Dynamic shared memory: xs [MT][rows * PF] fp32, then xrow [MT][rows] fp32, rows = this block's qweight rows.
// PREFETCH: a worker issues its next chunk's loads before it uses the current one (twice the registers).
// HALF2 (4 bits, batch 1): products in x's half2 arithmetic (word_dot_half2); xs then holds per qweight row the
// pairs (x_j, x_{j+4}), j = 0..3, as 4 words of x's dtype.
// ROTATE (4 bits): x is rotated by a's power-of-two block Hadamard (rot_n, which divides this block's slice) as it
// is staged, one launch instead of hadamard_transform's kernel, its output buffer and this kernel reading it back;
// the staged values, hence the sums, are bit for bit those of the two launches.
template <int BITS, int MT, int U, int TX, bool PREFETCH, DType XT, DType ST, bool HALF2 = false, bool ROTATE = false>
__global__ void __launch_bounds__(kThreads, staged_min_blocks<U, PREFETCH>(MT)) gemv_gptq_staged_kernel(GemvArgs a) {
  constexpr int PF = 32 / BITS;     // inputs per word
  constexpr int LANES = 16 / BITS;  // codes per 16-bit half
  constexpr int TY = kThreads / TX;  // row workers per block
  constexpr int CT = 4 * TX;         // columns per block
  static_assert(PF == 4 || PF == 8, "the staged GEMV takes 4 and 8 bits");
  static_assert(!HALF2 || (BITS == 4 && MT == 1 && !PREFETCH), "the half2 variant: 4 bits, batch 1");
  static_assert(!ROTATE || (PF == 8 && !HALF2), "the rotation takes a qweight row's 8 inputs as one group of 8");
  extern __shared__ float4 staged_smem[];
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * CT + tx * 4;
  const bool active = n0 < a.out_features;  // out % 4 == 0: a lane's 4 columns are all in or all out

  const int64_t chunks = a.rows / U;
  const int64_t c0 = chunks * blockIdx.y / a.split, c1 = chunks * (blockIdx.y + 1) / a.split;
  const int nrows = static_cast<int>((c1 - c0) * U);
  const int nin = nrows * PF;
  float* xs = reinterpret_cast<float*>(staged_smem);
  float* xrow = xs + MT * nin;

  const int64_t chunk_inputs = int64_t{U} * PF;
  // A chunk's loads: its U qweight rows, the group's 4 scales and its zero word, kept raw so that nothing waits on
  // them before the chunk is used.
  uint4 q[U];
  GroupRaw graw = {};
  auto load_chunk = [&](int64_t c, uint4(&qo)[U], GroupRaw& go) {
    const int32_t* qp = a.qweight + c * U * a.out_features + n0;
#pragma unroll
    for (int u = 0; u < U; ++u) qo[u] = load_stream(qp + u * a.out_features);
    go = load_group_raw<BITS>(a, c * chunk_inputs / a.group, n0);
  };
  int64_t c = c0 + ty;
  if (active && c < c1) load_chunk(c, q, graw);

  // Stage x: one qweight row's PF inputs per thread and step, given as PF/2 words of x's dtype.
  const int in32 = static_cast<int>(a.in);
  auto stage_row = [&](int m, int r, const uint32_t(&xw)[PF / 2]) {
    float xf[PF];
#pragma unroll
    for (int i = 0; i < PF / 2; ++i) {
      xf[2 * i] = lo_f32<XT>(xw[i]);
      xf[2 * i + 1] = hi_f32<XT>(xw[i]);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < PF; ++j) s += xf[j];
    xrow[m * nrows + r] = s;
    if constexpr (HALF2) {
      reinterpret_cast<uint4*>(staged_smem)[m * nrows + r] =
          make_uint4(__byte_perm(xw[0], xw[2], 0x5410), __byte_perm(xw[0], xw[2], 0x7632),
                     __byte_perm(xw[1], xw[3], 0x5410), __byte_perm(xw[1], xw[3], 0x7632));
      return;
    }
    float4* dst = reinterpret_cast<float4*>(xs + m * nin + r * PF);
#pragma unroll
    for (int i = 0; i < PF / 4; ++i)
      dst[i] = make_float4(xf[4 * i] * inv_pow2(BITS * ((4 * i) % LANES)),
                           xf[4 * i + 1] * inv_pow2(BITS * ((4 * i + 1) % LANES)),
                           xf[4 * i + 2] * inv_pow2(BITS * ((4 * i + 2) % LANES)),
                           xf[4 * i + 3] * inv_pow2(BITS * ((4 * i + 3) % LANES)));
  };
  if constexpr (ROTATE) {
    // A row's 8 inputs are one butterfly group and consecutive threads take consecutive rows, so the rot_n-blocks
    // (rot_n / 8 <= 32 lanes, aligned) sit inside warps. Every lane runs every round for the shuffles; lanes past
    // the slice carry zeros, which no staged input pairs with (rot_n divides the slice).
    const int lane = threadIdx.x & 31;
    for (int r0 = 0; r0 < nrows; r0 += kThreads) {
      const int r = r0 + threadIdx.x;
      const bool valid = r < nrows;
      const int k0 = static_cast<int>((c0 * U + r) * PF);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.m) break;
        uint32_t xw[PF / 2] = {};
        if (valid) load_x_words<PF>(static_cast<const uint16_t*>(a.x) + m * in32 + k0, xw);
        rotate_x_words<XT>(a, k0, lane, xw);
        if (valid) stage_row(m, r, xw);
      }
    }
  } else {
    // Unrolled so that several steps' loads are in flight.
#pragma unroll 4
    for (int r = threadIdx.x; r < nrows; r += kThreads) {
      const int64_t k0 = (c0 * U + r) * PF;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.m) break;
        uint32_t xw[PF / 2];
        load_x_words<PF>(static_cast<const uint16_t*>(a.x) + m * in32 + k0, xw);
        stage_row(m, r, xw);
      }
    }
  }
  __syncthreads();

  float acc[MT][4] = {};
  if (active) {
    for (; c < c1; c += TY) {
      uint4 qn[PREFETCH ? U : 1];
      GroupRaw gn = {};
      if constexpr (PREFETCH) {
        if (c + TY < c1) load_chunk(c + TY, qn, gn);
      }
      float p[MT][4] = {};  // this chunk's sum(q * 2^(BITS*t) * x * 2^-(BITS*t)) per row and column
      const int rl0 = static_cast<int>(c - c0) * U;
      Half2Of<XT> hb0[4], hb1[4];  // HALF2: the zero points' terms (half2_zero_terms), per column
      if constexpr (HALF2) {
        float sc[4], zc[4];
        unpack_group<BITS, ST>(graw, n0, a.zero_add, sc, zc);
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) half2_zero_terms<XT>(zc[c4], hb0[c4], hb1[c4]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if constexpr (HALF2) {  // p: sum((q - z) * x / 16), see word_dot_half2
          const uint4 xv = reinterpret_cast<const uint4*>(staged_smem)[rl0 + u];
          p[0][0] += word_dot_half2<XT>(q[u].x, xv, hb0[0], hb1[0]);
          p[0][1] += word_dot_half2<XT>(q[u].y, xv, hb0[1], hb1[1]);
          p[0][2] += word_dot_half2<XT>(q[u].z, xv, hb0[2], hb1[2]);
          p[0][3] += word_dot_half2<XT>(q[u].w, xv, hb0[3], hb1[3]);
          continue;
        }
        float v[4][PF];
        dequant_row4<BITS>(q[u], v);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= a.m) break;
          const float4* xp = reinterpret_cast<const float4*>(xs + m * nin + (rl0 + u) * PF);
          float xf[PF];
#pragma unroll
          for (int i = 0; i < PF / 4; ++i) {
            const float4 t = xp[i];
            xf[4 * i] = t.x;
            xf[4 * i + 1] = t.y;
            xf[4 * i + 2] = t.z;
            xf[4 * i + 3] = t.w;
          }
#pragma unroll
          for (int c4 = 0; c4 < 4; ++c4)
#pragma unroll
            for (int j = 0; j < PF; ++j) p[m][c4] = fmaf(v[c4][j], xf[j], p[m][c4]);
        }
      }
      // Fold the chunk in before the next chunk's loads overwrite its scale and zero.
      float sc[4], zc[4];
      unpack_group<BITS, ST>(graw, n0, a.zero_add, sc, zc);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.m) break;
        if constexpr (HALF2) {  // the zero points are already in p
#pragma unroll
          for (int c4 = 0; c4 < 4; ++c4) acc[m][c4] = fmaf(sc[c4], 16.0f * p[m][c4], acc[m][c4]);
          continue;
        }
        float sx = 0.0f;
#pragma unroll
        for (int u = 0; u < U; ++u) sx += xrow[m * nrows + rl0 + u];
#pragma unroll
        for (int c4 = 0; c4 < 4; ++c4) acc[m][c4] = fmaf(sc[c4], fmaf(-zc[c4], sx, p[m][c4]), acc[m][c4]);
      }
      if constexpr (PREFETCH) {
#pragma unroll
        for (int u = 0; u < U; ++u) q[u] = qn[u];
        graw = gn;
      } else if (c + TY < c1) {
        load_chunk(c + TY, q, graw);
      }
    }
  }
  reduce_store<MT, 4, TX, XT>(acc, a);
}

// ---- GEMV, GPTQ 4 bits on the tensor cores ("mma"; FASTROUND_WOQ_CUDA_VARIANT=mma) ----
// The staged kernel spends ~25 instructions per qweight word on fp32 FMAs; here mma.sync m16n8k16 takes the
// products, 16x16 weights by 16x8 activations per instruction. The mma's M rows are output columns, its N = 8
// columns the batch rows (those past m carry zeros) and its K the inputs, in an order both operands share (the sum
// over K does not care): a lane's qweight word feeds its A pairs directly, with no shuffles and no half-used loads.
//   lane = 4g + t; per step a warp covers 4 qweight rows (32 inputs) x 32 output columns; lane (g, t) loads the
//   16-byte word run of qweight row 4s + t, columns 4g .. 4g+3 of the tile (8 lanes: one 128-byte segment per row)
//   and 16 bytes of x row g (inputs 8(4s+t) .. +7). Column pair (4g + 2i, 4g + 2i + 1) is A's rows (g, g + 8) of
//   mma tile i (i = 0, 1); its two k-halves h take codes (2h, 2h+4) and (2h+1, 2h+5) of each word, which the
//   magic-number dequant puts in a 16-bit pair with one shift and one LOP3, and x's matching pairs (x_j, x_{j+4}).
// Dequantization is exact in x's 16-bit type: (0x4300 | q) is bf16 128 + q and (0x6400 | q) fp16 1024 + q, so one
// HSUB2 of (magic + z) leaves q - z (|q - z| <= 16, representable). The products of 16-bit values are exact in
// the fp32 accumulator; the group scale stays out of the mma: sum((q - z) x) per group in fp32, times the fp32
// scale into the running total at the group's end, so only fp32 sums round (the tensor cores' accumulation, then
// fmaf), unlike the half2 variant's 16-bit products, and once to x's dtype at the store. Needs group % 32 == 0 (a
// step inside one group) and in % 32 == 0.
// Blocks: 32 columns x 8 warps, each warp a contiguous run of steps of blockIdx.y's share of the inputs; the warps
// meet in shared memory and the blocks of a cluster (split-K) in distributed shared memory (block_store).

constexpr int kMmaCols = 32;   // output columns per block (and per warp)
constexpr int kBatchCols = 8;  // the mma's N: batch rows, those past m zero

template <DType XT>
struct MmaMagic;
template <>
struct MmaMagic<DType::BF16> {
  static constexpr uint32_t value = 0x43004300u;  // bf16 (128, 128): one mantissa unit is 1
};
template <>
struct MmaMagic<DType::F16> {
  static constexpr uint32_t value = 0x64006400u;  // fp16 (1024, 1024): one mantissa unit is 1
};

// d [16 x 8 fp32] += a [16 x 16] * b [16 x 8], 16-bit operands of x's dtype, row.col fragments of m16n8k16.
template <DType XT>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (XT == DType::BF16) {
    asm(  // no side effects: the scheduler may move it
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm(  // no side effects: the scheduler may move it
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host never launches the mma kernel below sm_80 (cached_plan_mma)
#endif
}

// The pair (q_j - z, q_{j+4} - z) in x's 16-bit type from a word shifted so that code j sits at bit 0;
// zm = (magic + z) in both halves.
template <DType XT>
__device__ __forceinline__ uint32_t code_pair(uint32_t shifted, uint32_t zm) {
  // (shifted & 0x000F000F) | magic as one LOP3 (0xEA: a & b | c): written as C, ptxas emits two, one per immediate.
  uint32_t biased;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(biased) : "r"(shifted), "n"(0x000F000F), "n"(MmaMagic<XT>::value));
  const Half2Of<XT> v = __hsub2(half2_bits<XT>(biased), half2_bits<XT>(zm));
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <int U, DType XT, DType ST>
__global__ void __launch_bounds__(kThreads, 2) gemv_gptq_mma_kernel(GemvArgs a) {
  __shared__ float part[kWarps][kBatchCols * kMmaCols];  // [warp][batch row * 32 + column of the tile]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmaCols + 4 * g;  // this lane's 4 columns
  const bool active = n0 < a.out_features;  // out % 4 == 0: all 4 in or all out
  const bool has_x = g < a.m;               // batch rows past m multiply by zeros

  // Steps of 4 qweight rows (32-bit: in < 2^31): blockIdx.y's share, then this warp's contiguous run.
  const int steps = static_cast<int>(a.rows / 4);
  const int b0 = static_cast<int>(int64_t{steps} * blockIdx.y / a.split);
  const int b1 = static_cast<int>(int64_t{steps} * (blockIdx.y + 1) / a.split);
  const int s0 = b0 + (b1 - b0) * warp / kWarps, s1 = b0 + (b1 - b0) * (warp + 1) / kWarps;
  const int steps_per_group = static_cast<int>(a.group / 32);

  float c[2][4] = {};    // this group's sum((q - z) x): tile i, mma C fragment (columns 4g+2i, 4g+2i+1)
  float acc[2][4] = {};  // the scaled total, same layout
  uint2 sc_raw = {};     // the group's scales of columns n0 .. n0+3 as loaded (ST words), widened at the fold
  uint32_t zm[4] = {};   // (magic + z) pairs of the 4 columns
  // magic + the stored zero's offset (gptq v1: +1) in both halves; the codes' zero points add to it.
  const uint32_t z_base = MmaMagic<XT>::value + static_cast<uint32_t>(a.zero_add) * 0x00010001u;
  // Groups are walked in order, one multiply per boundary: g_end is the first step past the current group (s0:
  // the first step opens one) and g_next the group starting there.
  int g_next = s0 / steps_per_group, g_end = s0;
  auto fold = [&]() {
    const float sc[4] = {lo_f32<ST>(sc_raw.x), hi_f32<ST>(sc_raw.x), lo_f32<ST>(sc_raw.y), hi_f32<ST>(sc_raw.y)};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = fmaf(sc[2 * i + (j >> 1)], c[i][j], acc[i][j]);
        c[i][j] = 0.0f;
      }
  };
  // Integer work only: the group's zero points straight from their nibbles (n0 % 8 is 0 or 4).
  auto set_group = [&](const GroupRaw& r) {
    sc_raw = r.scales;
    const uint32_t zw = r.zeros >> (4 * (n0 & 7));
#pragma unroll
    for (int k = 0; k < 4; ++k) zm[k] = ((zw >> (4 * k)) & 0xFu) * 0x00010001u + z_base;
  };

  // Running pointers at this lane's qweight row 4s + t (columns n0 ..) and x[g, 8(4s + t) ..].
  const int64_t row0 = 4 * s0 + t;
  const int32_t* qp = a.qweight + row0 * a.out_features + n0;
  const uint16_t* xp = static_cast<const uint16_t*>(a.x) + static_cast<int64_t>(g) * a.in + row0 * 8;
  const int64_t q_step = 4 * a.out_features;
  for (int s = s0; s < s1; s += U) {
    uint4 q[U], xv[U];  // per step: qweight row 4s+t at n0 .. n0+3, and x[g, 8(4s+t) .. +7]
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in_run = s + u < s1;
      q[u] = in_run && active ? load_stream(qp) : make_uint4(0, 0, 0, 0);
      xv[u] = in_run && has_x ? __ldg(reinterpret_cast<const uint4*>(xp)) : make_uint4(0, 0, 0, 0);
      qp += q_step;
      xp += 32;
    }
    // A group opening at the chunk's first step is loaded with the chunk; one opening later inside the chunk
    // (groups of 32 to 96 inputs) where it starts.
    const bool opens = s == g_end;
    const GroupRaw g_pre = active && opens ? load_group_raw<4>(a, g_next, n0) : GroupRaw{};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int st = s + u;
      if (st >= s1) break;
      if (st == g_end) {  // warp-uniform: the warp's lanes share the step
        fold();
        set_group(u == 0 ? g_pre : active ? load_group_raw<4>(a, g_next, n0) : GroupRaw{});
        g_end = (g_next + 1) * steps_per_group;
        ++g_next;
      }
      // x's pairs (x_j, x_{j+4}), j = 0..3: the B fragments of k-half 0 (j = 0, 1) and 1 (j = 2, 3).
      const uint32_t x04 = __byte_perm(xv[u].x, xv[u].z, 0x5410), x15 = __byte_perm(xv[u].x, xv[u].z, 0x7632);
      const uint32_t x26 = __byte_perm(xv[u].y, xv[u].w, 0x5410), x37 = __byte_perm(xv[u].y, xv[u].w, 0x7632);
      const uint32_t w[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint32_t wa = w[2 * i], wb = w[2 * i + 1];  // A rows g and g + 8
        const uint32_t za = zm[2 * i], zb = zm[2 * i + 1];
        mma_16816<XT>(c[i], code_pair<XT>(wa, za), code_pair<XT>(wb, zb), code_pair<XT>(wa >> 4, za),
                      code_pair<XT>(wb >> 4, zb), x04, x15);
        mma_16816<XT>(c[i], code_pair<XT>(wa >> 8, za), code_pair<XT>(wb >> 8, zb), code_pair<XT>(wa >> 12, za),
                      code_pair<XT>(wb >> 12, zb), x26, x37);
      }
    }
  }
  fold();
  // C fragment (row, col) = (column 4g + 2i + (j >> 1), batch 2t + (j & 1)).
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) part[warp][(2 * t + (j & 1)) * kMmaCols + 4 * g + 2 * i + (j >> 1)] = acc[i][j];
  block_store<kBatchCols, kMmaCols, XT>(part, a);
}

// ---- GEMV, AWQ layout (4 bits) ----
// Thread tile: one load = one input k x 8*WORDS consecutive output columns (WORDS words of 8 interleaved codes).

template <int WORDS>
__device__ __forceinline__ void load_words(const int32_t* p, uint32_t (&w)[WORDS]) {
  static_assert(WORDS == 1 || WORDS == 2, "see kAwqCols");
  if constexpr (WORDS == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
  }
}

template <int MT, int WORDS, int U, DType XT, DType ST>
__global__ void __launch_bounds__(kThreads) gemv_awq_kernel(GemvArgs a) {
  constexpr int TX = 16 / WORDS;
  constexpr int CPT = 8 * WORDS;  // columns per thread
  static_assert(TX * CPT == kAwqCols, "a tile is 128 columns");
  const int tx = threadIdx.x % TX;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kAwqCols + tx * CPT;
  const bool active = n0 < a.out_features;  // out % 32 == 0: a thread's columns are all in or all out
  const int64_t ow = a.out_features / 8;     // words per qweight / qzeros row
  int64_t r, r1;
  thread_rows<TX>(a, r, r1);
  if (!active) r1 = r;

  // Slot order: index 8*w + s is word w's nibble slot s.
  float acc[MT][CPT] = {};
  float accg[MT][CPT] = {};
  float sx[MT] = {};
  float sc[CPT] = {}, zc[CPT] = {};
  int64_t g_end = r;
  auto flush = [&]() {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        // accg holds sum(q * 2^(4t) * x) with t = s % 4; sc carries 2^-(4t), zc the scale times the zero.
        acc[m][i] = fmaf(sc[i], accg[m][i], fmaf(-zc[i], sx[m], acc[m][i]));
        accg[m][i] = 0.0f;
      }
      sx[m] = 0.0f;
    }
  };
  auto load_group = [&](int64_t row) {
    const int64_t g = row / a.group;
    g_end = (g + 1) * a.group;
    const uint4* sp = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.scales) + g * a.out_features + n0);
    uint32_t zw[WORDS];
#pragma unroll
    for (int w = 0; w < WORDS; ++w) zw[w] = static_cast<uint32_t>(__ldg(a.qzeros + g * ow + n0 / 8 + w));
#pragma unroll
    for (int w = 0; w < WORDS; ++w) {
      const uint4 sv = __ldg(sp + w);  // scales of columns 8w .. 8w+7
      const uint32_t s2[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int col = awq_slot_column(s);
        const float scol = (col & 1) ? hi_f32<ST>(s2[col >> 1]) : lo_f32<ST>(s2[col >> 1]);
        sc[8 * w + s] = scol * inv_pow2(4 * (s % 4));
        zc[8 * w + s] = scol * static_cast<float>((zw[w] >> (4 * s)) & 0xFu);
      }
    }
  };

  // Running pointers: qweight row r at this thread's words, x[0, r]; rows of x are `in` apart.
  const int32_t* qp = a.qweight + r * ow + n0 / 8;
  const uint16_t* xr = static_cast<const uint16_t*>(a.x) + r;
  const int in32 = static_cast<int>(a.in);
  for (; r < r1; r += U) {
    uint32_t q[U][WORDS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (r + u < r1) {
        load_words<WORDS>(qp, q[u]);
      } else {
#pragma unroll
        for (int w = 0; w < WORDS; ++w) q[u][w] = 0;
      }
      qp += ow;
    }
#pragma unroll
    for (int u = 0; u < U; ++u, ++xr) {
      const int64_t row = r + u;
      if (row >= r1) break;
      if (row >= g_end) {
        flush();
        load_group(row);
      }
      float v[CPT];
#pragma unroll
      for (int w = 0; w < WORDS; ++w) {
        const uint32_t lo = q[u][w], hi = q[u][w] >> 16;
        v[8 * w + 0] = code_scaled<4, 0>(lo);
        v[8 * w + 1] = code_scaled<4, 1>(lo);
        v[8 * w + 2] = code_scaled<4, 2>(lo);
        v[8 * w + 3] = code_scaled<4, 3>(lo);
        v[8 * w + 4] = code_scaled<4, 0>(hi);
        v[8 * w + 5] = code_scaled<4, 1>(hi);
        v[8 * w + 6] = code_scaled<4, 2>(hi);
        v[8 * w + 7] = code_scaled<4, 3>(hi);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= a.m) break;
        const float xv = lo_f32<XT>(__ldg(xr + m * in32));
        sx[m] += xv;
#pragma unroll
        for (int i = 0; i < CPT; ++i) accg[m][i] = fmaf(v[i], xv, accg[m][i]);
      }
    }
  }
  flush();
  // Slots back to column order for the store.
  float out[MT][CPT];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int w = 0; w < WORDS; ++w)
#pragma unroll
      for (int s = 0; s < 8; ++s) out[m][8 * w + awq_slot_column(s)] = acc[m][8 * w + s];
  reduce_store<MT, CPT, TX, XT>(out, a);
}

// ---- dequantize: dst [in, out] ----

struct DequantArgs {
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  void* dst;
  int64_t in, out_features, group, rows, zwords;
  float zero_add;
};

// One thread per qweight word: (row, column n), writing its PF inputs (those below `in`) at column n. Consecutive threads take
// consecutive columns, so reads and writes are coalesced.
template <int BITS, DType ST, DType OT>
__global__ void __launch_bounds__(kThreads) dequant_gptq_kernel(DequantArgs a) {
  constexpr int PF = 32 / BITS;
  constexpr uint32_t kCodeMask = (1u << BITS) - 1u;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= a.out_features) return;
  for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
    const uint32_t w = static_cast<uint32_t>(a.qweight[row * a.out_features + n]);
    // Consecutive inputs cross at most one group boundary at a time: one division per word.
    int64_t g = (row * PF) / a.group - 1, g_end = (g + 1) * a.group;
    float s = 0.0f, z = 0.0f;
#pragma unroll
    for (int j = 0; j < PF; ++j) {
      const int64_t k = row * PF + j;
      if (k >= a.in) break;
      if (k >= g_end) {
        ++g;
        g_end += a.group;
        s = load_el<ST>(a.scales, g * a.out_features + n);
        const uint32_t zw = static_cast<uint32_t>(a.qzeros[g * a.zwords + n / PF]);
        z = static_cast<float>((zw >> (BITS * (n % PF))) & kCodeMask) + a.zero_add;
      }
      const float q = static_cast<float>((w >> (BITS * j)) & kCodeMask);
      store_el<OT>(a.dst, k * a.out_features + n, (q - z) * s);
    }
  }
}

// One thread per qweight word: (input k, 8 columns 8w .. 8w+7).
template <DType ST, DType OT>
__global__ void __launch_bounds__(kThreads) dequant_awq_kernel(DequantArgs a) {
  const int64_t ow = a.out_features / 8;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (w >= ow) return;
  for (int64_t k = blockIdx.y; k < a.in; k += gridDim.y) {
    const int64_t g = k / a.group;
    const uint32_t word = static_cast<uint32_t>(a.qweight[k * ow + w]);
    const uint32_t zw = static_cast<uint32_t>(a.qzeros[g * ow + w]);
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int64_t n = 8 * w + awq_slot_column(s);
      const float q = static_cast<float>((word >> (4 * s)) & 0xFu);
      const float z = static_cast<float>((zw >> (4 * s)) & 0xFu);
      store_el<OT>(a.dst, k * a.out_features + n, (q - z) * load_el<ST>(a.scales, g * a.out_features + n));
    }
  }
}

// ---- host side ----

void check_launch(const char* site, cudaError_t e = cudaSuccess) {
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("[") + site + "] CUDA launch failed: " + cudaGetErrorString(e));
}

[[noreturn]] void bad(const char* site, const std::string& what) {
  throw OptionError(std::string("[") + site + "] " + what);
}

template <typename F>
void with_half_dtype(DType d, const char* site, const char* name, F&& f) {
  switch (d) {
    case DType::F16: f(DTag<DType::F16>{}); return;
    case DType::BF16: f(DTag<DType::BF16>{}); return;
    default: bad(site, std::string(name) + " dtype must be F16 or BF16, got " + std::string(dtype_name(d)));
  }
}

template <typename F>
void with_float_dtype(DType d, const char* site, const char* name, F&& f) {
  if (d == DType::F32) {
    f(DTag<DType::F32>{});
    return;
  }
  with_half_dtype(d, site, name, f);
}

template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    default: f(std::integral_constant<int, 8>{}); return;  // woq_check admits 2, 4 and 8 only
  }
}

template <typename F>
void with_rows(int64_t m, F&& f) {
  if (m <= 1) f(std::integral_constant<int, 1>{});
  else if (m <= 2) f(std::integral_constant<int, 2>{});
  else if (m <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

// Loads in flight per thread: tunable at batch 1 only, so that larger batches instantiate one kernel each.
template <int MT, typename F>
void with_unroll(int u, F&& f) {
  if constexpr (MT == 1) {
    switch (u) {
      case 2: f(std::integral_constant<int, 2>{}); return;
      case 4: f(std::integral_constant<int, 4>{}); return;
      case 16: f(std::integral_constant<int, 16>{}); return;
      default: break;
    }
  }
  f(std::integral_constant<int, kBatch>{});
}

bool aligned(const void* p, uintptr_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

int64_t zwords_of(const WoqWeights& w) {
  const int64_t pf = 32 / w.bits;
  return (w.out + pf - 1) / pf;
}

// SMs per device, and per kernel the resident blocks per SM and the largest cluster it can be launched with
// (asked once: the op runs at every decode step).
struct GpuShape {
  int sms;
  int per_sm;
  int max_split;
};

struct KernelShape {
  int per_sm = 1;
  int max_split = 1;
};

KernelShape kernel_shape(const void* kernel) {
  constexpr const char* site = "woq_gemv_cuda";
  KernelShape k;
  check_launch(site, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&k.per_sm, kernel, kThreads, 0));
  for (int split = 2; split <= kMaxSplit; split *= 2) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1, static_cast<unsigned>(split), 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = static_cast<unsigned>(split);
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters <= 0) {
      (void)cudaGetLastError();  // a refused configuration is not sticky; do not report it at the next launch
      break;
    }
    k.max_split = split;
  }
  return k;
}

GpuShape gpu_shape(const void* kernel) {
  static std::mutex mu;
  static std::vector<int> sms;                                  // by device index, 0: not asked yet
  static std::unordered_map<const void*, KernelShape> kernels;  // by kernel
  constexpr const char* site = "woq_gemv_cuda";
  int device = 0;
  check_launch(site, cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<size_t>(device) >= sms.size()) sms.resize(static_cast<size_t>(device) + 1, 0);
  if (sms[device] == 0) check_launch(site, cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device));
  auto it = kernels.find(kernel);
  if (it == kernels.end()) it = kernels.emplace(kernel, kernel_shape(kernel)).first;
  return {std::max(1, sms[device]), std::max(1, it->second.per_sm), it->second.max_split};
}

// Blocks of a cluster along the inputs. A block's time is about its rows per thread (each waits on its own loads),
// so the kernel takes about waves x rows / split, waves = ceil(tiles * split / resident blocks): the split that
// minimizes it, the smallest on ties, keeping at least 4 rows per thread. Llama-3-8B shapes at batch 1 on an
// H200 (132 SMs, 3 blocks each): 4096 x 4096 -> 2, 4096 x 14336 -> 4 (448 tiles alone would leave a second wave
// almost empty), 14336 x 4096 -> 8.
int choose_split(const void* kernel, int64_t tiles, int64_t rows, int ty) {
  const GpuShape g = gpu_shape(kernel);
  const int64_t resident = static_cast<int64_t>(g.sms) * g.per_sm;
  int best = 1;
  double best_cost = 0.0;
  for (int split = 1; split <= g.max_split; split *= 2) {
    if (split > 1 && rows / split < int64_t{ty} * 4) break;
    const int64_t waves = (tiles * split + resident - 1) / resident;
    const double cost = static_cast<double>(waves) / split;
    if (split == 1 || cost < best_cost * (1.0 - 1e-9)) {
      best = split;
      best_cost = cost;
    }
  }
  return best;
}

// A forced split (benchmarks) is rounded down to a power of two the device admits for this kernel.
int forced_split(const void* kernel, int split) {
  const int cap = gpu_shape(kernel).max_split;
  int s = 1;
  while (s * 2 <= std::min(split, cap)) s *= 2;
  return s;
}

template <typename Kernel>
void launch_gemv(Kernel kernel, GemvArgs a, int64_t tiles, int ty, cudaStream_t stream, int split = 0) {
  constexpr const char* site = "woq_gemv_cuda";
  const void* k = reinterpret_cast<const void*>(kernel);
  a.split = split > 0 ? forced_split(k, split) : choose_split(k, tiles, a.rows, ty);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(a.split), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(a.split);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = a.split > 1 ? 1 : 0;
  check_launch(site, cudaLaunchKernelEx(&cfg, kernel, a));
}

// ---- the staged GEMV's launch plan ----

using GemvKernel = void (*)(GemvArgs);

// The instantiated (loads per chunk U, lanes per row worker TX) of the staged kernel: batch 1 at 4 bits takes every
// benchmark choice (prefetch with U 4 and 8, TX 32 and 16), batch 1 at 8 bits and batches 2..8 at 4 bits a few
// (compile time), the rest the rows kernel.
// Registers (sm_90, ptxas -v, no spills): batch 1 U 4 / 8 / 16: 56 / 72 / 107, with prefetch U 4 / 8: 77 / 122;
// batches 2 and 4 at U 8: 114 / 128; batch 8 at U 4: 168.
// half2 (4 bits, batch 1, no prefetch): the settings the planner picks on the Llama shapes and their neighbours.
// ROTATE (4 bits, batches 1..4, no half2): the same settings rotating x as they stage it (rotated_plan); at most 6
// registers above the plain ones, under the same caps (ptxas -v, sm_90: batch 1 U 4 / 8 / 16: 56 / 72 / 107-112,
// batch 2 at U 8: 118-120), no spills.
template <int BITS, int MT, DType XT, DType ST, bool ROTATE = false>
GemvKernel staged_kernel(int u, int tx, bool prefetch, bool half2 = false) {
  constexpr bool R = ROTATE;
  if constexpr (ROTATE && (BITS != 4 || MT > 4)) {
    return nullptr;
  } else if constexpr (BITS == 4 && MT == 1) {
    if (half2) {
      if (ROTATE) return nullptr;
      if (prefetch) return nullptr;
      switch (u * 100 + tx) {
        case 408: return gemv_gptq_staged_kernel<4, 1, 4, 8, false, XT, ST, true>;
        case 416: return gemv_gptq_staged_kernel<4, 1, 4, 16, false, XT, ST, true>;
        case 808: return gemv_gptq_staged_kernel<4, 1, 8, 8, false, XT, ST, true>;
        case 816: return gemv_gptq_staged_kernel<4, 1, 8, 16, false, XT, ST, true>;
        case 832: return gemv_gptq_staged_kernel<4, 1, 8, 32, false, XT, ST, true>;
        case 1608: return gemv_gptq_staged_kernel<4, 1, 16, 8, false, XT, ST, true>;
        default: return nullptr;
      }
    }
    if (prefetch) {
      switch (u * 100 + tx) {
        case 432: return gemv_gptq_staged_kernel<4, 1, 4, 32, true, XT, ST, false, R>;
        case 416: return gemv_gptq_staged_kernel<4, 1, 4, 16, true, XT, ST, false, R>;
        case 832: return gemv_gptq_staged_kernel<4, 1, 8, 32, true, XT, ST, false, R>;
        case 816: return gemv_gptq_staged_kernel<4, 1, 8, 16, true, XT, ST, false, R>;
        default: return nullptr;
      }
    }
    switch (u * 100 + tx) {
      case 432: return gemv_gptq_staged_kernel<4, 1, 4, 32, false, XT, ST, false, R>;
      case 416: return gemv_gptq_staged_kernel<4, 1, 4, 16, false, XT, ST, false, R>;
      case 408: return gemv_gptq_staged_kernel<4, 1, 4, 8, false, XT, ST, false, R>;
      case 832: return gemv_gptq_staged_kernel<4, 1, 8, 32, false, XT, ST, false, R>;
      case 816: return gemv_gptq_staged_kernel<4, 1, 8, 16, false, XT, ST, false, R>;
      case 808: return gemv_gptq_staged_kernel<4, 1, 8, 8, false, XT, ST, false, R>;
      case 1632: return gemv_gptq_staged_kernel<4, 1, 16, 32, false, XT, ST, false, R>;
      case 1616: return gemv_gptq_staged_kernel<4, 1, 16, 16, false, XT, ST, false, R>;
      case 1608: return gemv_gptq_staged_kernel<4, 1, 16, 8, false, XT, ST, false, R>;
      default: return nullptr;
    }
  } else if constexpr (BITS == 8 && MT == 1) {
    if (prefetch || half2) return nullptr;
    switch (u * 100 + tx) {
      case 432: return gemv_gptq_staged_kernel<8, 1, 4, 32, false, XT, ST>;
      case 416: return gemv_gptq_staged_kernel<8, 1, 4, 16, false, XT, ST>;
      case 832: return gemv_gptq_staged_kernel<8, 1, 8, 32, false, XT, ST>;
      case 816: return gemv_gptq_staged_kernel<8, 1, 8, 16, false, XT, ST>;
      default: return nullptr;
    }
  } else if constexpr (BITS == 4) {
    constexpr int U = MT <= 4 ? 8 : 4;  // batch 8 with 8 rows a chunk spills at 128 registers
    if (prefetch || half2) return nullptr;
    switch (u * 100 + tx) {
      case U * 100 + 32: return gemv_gptq_staged_kernel<4, MT, U, 32, false, XT, ST, false, R>;
      case U * 100 + 16: return gemv_gptq_staged_kernel<4, MT, U, 16, false, XT, ST, false, R>;
      default: return nullptr;
    }
  }
  return nullptr;
}

struct StagedPlan {
  GemvKernel kernel = nullptr;  // null: the staged kernel does not take this problem
  int split = 1;
  int64_t tiles = 0;
  size_t smem = 0;
  int u = 0, tx = 0;  // the setting behind `kernel`, which rotated_plan instantiates again
  bool prefetch = false, half2 = false;
};

// Per kernel: the dynamic shared memory it may take (the device's opt-in limit less its static part), raised once
// so that large activation slices fit.
size_t staged_max_dynamic(GemvKernel k) {
  static std::mutex mu;
  static std::unordered_map<const void*, size_t> seen;
  constexpr const char* site = "woq_gemv_cuda";
  std::lock_guard<std::mutex> lock(mu);
  const void* key = reinterpret_cast<const void*>(k);
  auto it = seen.find(key);
  if (it != seen.end()) return it->second;
  int device = 0, optin = 0;
  check_launch(site, cudaGetDevice(&device));
  check_launch(site, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  check_launch(site, cudaFuncGetAttributes(&attr, key));
  const size_t dyn = static_cast<size_t>(std::max(0, optin - static_cast<int>(attr.sharedSizeBytes)));
  check_launch(site, cudaFuncSetAttribute(key, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)));
  seen.emplace(key, dyn);
  return dyn;
}

int staged_blocks_per_sm(GemvKernel k, size_t smem) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, reinterpret_cast<const void*>(k), kThreads, smem) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

bool staged_cluster_fits(GemvKernel k, int split, size_t smem) {
  if (split == 1) return true;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, static_cast<unsigned>(split), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(split);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, reinterpret_cast<const void*>(k), &cfg) != cudaSuccess ||
      clusters <= 0) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

// ---- the staged GEMV's launch planner: a cost model of one launch ----
//
// A setting (U qweight rows per chunk, TX lanes per row worker, cluster split S) launches B = ceil(out / 4TX) * S
// blocks of kThreads; each block converts its share of x (rows/S qweight rows) into shared memory, then its
// TY = kThreads/TX row workers each walk `chain` = ceil(chunks per block / TY) chunks: issue U 16-byte loads, wait
// for them, dequantize and multiply. Costed in microseconds, less what every setting of a problem pays alike
// (the launch, streaming the packed weight once), so only comparisons are meaningful:
//   blocks per SM   the busiest SM takes bsm = ceil(B / (sms * f(S))) blocks, f(S) the share of SMs a cluster
//                   launch spreads over (1 up to S = 2, 0.85 at 4, 0.77 at 8: a cluster sits inside one GPC);
//                   conc = min(bsm, resident blocks per SM) run at once, in waves = ceil(bsm / resident)
//   chunk step      a round trip of kRoundTripUs + kPerLoadUs * U, then I = U * (codes * (2 + MT) + 4)
//                   instructions per warp (codes per 16-byte load: 32 at 4 bits, 16 at 8; a mask, an FADD and MT
//                   FMAs each) at max(kLoneCpi, warps * kSharedCpi / 4) cycles apiece: a lone warp waits on its
//                   own dependent FMAs, while the SM's warps = conc * 8 * (share of workers given a chunk) that
//                   compute at once share its 4 schedulers
//   block           kStageUs per 4096 staged inputs times conc (the resident blocks stage at once, on the same
//                   SM) + chain * step + kClusterUs when S > 1 (cluster barrier, the sums through DSMEM)
//   cost            waves * block
// Its constants are fitted to the H200 sweep (benchmarks/results/woq_cuda_staged-h200.json: 272 batch-1 timings
// over 8 Llama-3-8B problems at 4 and 8 bits, 8% rms error in log time); its choice there is within 2% of the
// best time measured on every problem (any kernel) but 8-bit 4096 x 4096, the best staged setting there and 3.5%
// behind the rows kernel; the previous model (bytes at a fixed bandwidth plus a round trip per chunk) chose a
// setting 32% slower than the best on the down_proj shape. Two settings stay out of the automatic choice, both
// measured slower wherever the model cannot tell them apart: U = 16 (107 registers, 2 blocks per SM) unless each
// worker has one chunk and all blocks fit in one wave (staged_auto_admits), and prefetch (twice the registers for
// an overlap the other resident warps already give). The model is plain C++ in infer/woq_cuda_plan.h, replayed on
// the sweep by cpp/tests/test_woq_cuda_plan.cpp. The half2 variant costs about 19 instructions per word instead.
//
// The staged kernel's configuration for this problem: the tuned (u, tx, split, prefetch) where given (0: any), else
// the cheapest by staged_cost; a chunk must sit inside one group and the activation slice in shared memory.
template <int BITS, int MT, DType XT, DType ST>
StagedPlan plan_staged(const WoqWeights& w, int64_t rows, const WoqGemvTuning& tune) {
  constexpr int PF = 32 / BITS;
  constexpr const char* site = "woq_gemv_cuda";
  int device = 0, sms = 0, clock_khz = 0;
  check_launch(site, cudaGetDevice(&device));
  check_launch(site, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device) != cudaSuccess) (void)cudaGetLastError();
  const bool half2 = tune.kernel == WoqGemvKernel::StagedHalf2;
  const StagedShape shape{rows, w.out, BITS, MT, std::max(sms, 1), clock_khz > 0 ? clock_khz * 1e-6 : 1.98, half2};
  const int us[3] = {8, 16, 4};
  const int txs[3] = {32, 16, 8};
  StagedPlan best;
  double best_cost = 0.0;
  for (int u : us) {
    if (tune.unroll != 0 && u != tune.unroll) continue;
    if (w.group % (int64_t{u} * PF) != 0 || rows % u != 0) continue;
    for (int tx : txs) {
      if (tune.tx != 0 && tx != tune.tx) continue;
      for (int pre = 0; pre < 2; ++pre) {
        if (tune.prefetch == 0 ? pre != 0 : pre != tune.prefetch - 1) continue;
        const GemvKernel k = staged_kernel<BITS, MT, XT, ST>(u, tx, pre != 0, half2);
        if (!k) continue;
        const size_t max_dyn = staged_max_dynamic(k);
        const int64_t chunks = rows / u;
        for (int split = 1; split <= kMaxSplit; split *= 2) {
          if (tune.split != 0 && split != tune.split) continue;
          if (split > chunks) break;
          const int64_t chunks_blk = (chunks + split - 1) / split;
          const size_t smem = static_cast<size_t>(MT) * 4 * static_cast<size_t>(chunks_blk * u * (PF + 1));
          if (smem > max_dyn) continue;
          const int per_sm = staged_blocks_per_sm(k, smem);
          if (per_sm <= 0 || !staged_cluster_fits(k, split, smem)) continue;
          const StagedCost cost = staged_cost(shape, {u, tx, split, per_sm});
          if (tune.unroll == 0 && !staged_auto_admits(u, cost)) continue;
          if (!best.kernel || cost.us < best_cost * (1.0 - 1e-9)) {
            best.kernel = k;
            best.split = split;
            best.tiles = (w.out + 4 * tx - 1) / (4 * tx);
            best.smem = smem;
            best.u = u;
            best.tx = tx;
            best.prefetch = pre != 0;
            best.half2 = half2;
            best_cost = cost.us;
          }
        }
      }
    }
  }
  return best;
}

// Plans are asked once per problem and tuning (the op runs at every decode step, and inside CUDA graph capture):
// make() runs on the first call for (the current device, key), its plan is returned from then on. Each caller's
// make type has its own table.
template <typename Make>
StagedPlan plan_once(const std::string& key, Make make) {
  static std::mutex mu;
  static std::unordered_map<std::string, StagedPlan> plans;
  int device = 0;
  check_launch("woq_gemv_cuda", cudaGetDevice(&device));
  const std::string k = std::to_string(device) + ":" + key;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(k);
  if (it == plans.end()) it = plans.emplace(k, make(device)).first;
  return it->second;
}

template <int BITS, int MT, DType XT, DType ST>
StagedPlan cached_plan_staged(const WoqWeights& w, int64_t rows, const WoqGemvTuning& tune) {
  const std::string key = std::to_string(w.in) + ":" + std::to_string(w.out) + ":" + std::to_string(w.group) + ":" +
                          std::to_string(tune.unroll) + ":" + std::to_string(tune.tx) + ":" +
                          std::to_string(tune.split) + ":" + std::to_string(tune.prefetch) + ":" +
                          std::to_string(static_cast<int>(tune.kernel));
  return plan_once(key, [&](int) { return plan_staged<BITS, MT, XT, ST>(w, rows, tune); });
}

// The plan `base` (the problem's staged plan without rotation) in the kernel that rotates x's rot_n-blocks as it
// stages them, or a null kernel where that kernel cannot take it: the same setting, so the same sums in the same
// order, provided every block's slice of x (whole chunks of U * 8 inputs) starts on a multiple of rot_n.
template <int BITS, int MT, DType XT, DType ST>
StagedPlan rotated_plan(const StagedPlan& base, int64_t rows, int64_t rot_n) {
  constexpr int PF = 32 / BITS;
  if (!base.kernel || base.half2 || rot_n < 1 || rot_n > 8 * 32 || (rot_n & (rot_n - 1)) != 0) return {};
  const int64_t chunks = rows / base.u;
  for (int y = 0; y <= base.split; ++y)
    if (chunks * y / base.split * base.u * PF % rot_n != 0) return {};
  StagedPlan p = base;
  p.kernel = staged_kernel<BITS, MT, XT, ST, true>(base.u, base.tx, base.prefetch);
  if (!p.kernel || staged_max_dynamic(p.kernel) < p.smem || staged_blocks_per_sm(p.kernel, p.smem) <= 0 ||
      !staged_cluster_fits(p.kernel, p.split, p.smem))
    return {};
  return p;
}

// rotated_plan, asked once per base plan, rows and block size (the fusion check runs at every call).
template <int BITS, int MT, DType XT, DType ST>
StagedPlan cached_rotated_plan(const StagedPlan& base, int64_t rows, int64_t rot_n) {
  const std::string key = std::to_string(reinterpret_cast<uintptr_t>(base.kernel)) + ":" +
                          std::to_string(base.split) + ":" + std::to_string(base.smem) + ":" + std::to_string(rows) +
                          ":" + std::to_string(rot_n);
  return plan_once(key, [&](int) { return rotated_plan<BITS, MT, XT, ST>(base, rows, rot_n); });
}

void launch_staged(const StagedPlan& p, GemvArgs a, cudaStream_t stream) {
  a.split = p.split;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.split), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(p.split);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.split > 1 ? 1 : 0;
  check_launch("woq_gemv_cuda", cudaLaunchKernelEx(&cfg, p.kernel, a));
}

// The staged plan woq_gemv_cuda launches for a GPTQ problem of m rows (null kernel: the rows kernel takes it), in
// the kernel rotating x's rot_n-blocks where rot_n > 0 (null kernel: that one cannot).
StagedPlan staged_plan_for(const WoqWeights& w, DType x_dtype, int64_t m, const WoqGemvTuning& staged_tune,
                           int64_t rot_n) {
  constexpr const char* site = "woq_gemv_cuda";
  const int64_t rows = w.in * w.bits / 32;
  StagedPlan plan;
  with_half_dtype(x_dtype, site, "x", [&](auto xt) {
    with_half_dtype(w.scale_dtype, site, "scales", [&](auto sd) {
      constexpr DType XT = decltype(xt)::value, SD = decltype(sd)::value;
      auto plan_for = [&](auto bits_c, auto mt_c) {
        constexpr int BITS = decltype(bits_c)::value, MT = decltype(mt_c)::value;
        plan = cached_plan_staged<BITS, MT, XT, SD>(w, rows, staged_tune);
        if (rot_n > 0) plan = cached_rotated_plan<BITS, MT, XT, SD>(plan, rows, rot_n);
      };
      with_rows(m, [&](auto mt) {
        if (w.bits == 4) plan_for(std::integral_constant<int, 4>{}, mt);
        else plan_for(std::integral_constant<int, 8>{}, mt);
      });
    });
  });
  return plan;
}

// What woq_gemv_cuda checks of its tuning, and the tuning its staged planner is given: the benchmark knobs at batch
// 1 only, and half2 at 4 bits only.
WoqGemvTuning checked_staged_tuning(const WoqWeights& w, int64_t m, const WoqGemvTuning& tune) {
  constexpr const char* site = "woq_gemv_cuda";
  const bool force_staged = tune.kernel == WoqGemvKernel::Staged || tune.kernel == WoqGemvKernel::StagedHalf2;
  if (tune.kernel != WoqGemvKernel::Auto && tune.kernel != WoqGemvKernel::Rows && !force_staged)
    bad(site, "tuning kernel must be auto, rows, staged or staged_half2");
  if (force_staged) {
    if (tune.unroll != 0 && tune.unroll != 4 && tune.unroll != 8 && tune.unroll != 16)
      bad(site, "staged tuning unroll must be 0, 4, 8 or 16, got " + std::to_string(tune.unroll));
    if (tune.split != 0 && tune.split != 1 && tune.split != 2 && tune.split != 4 && tune.split != 8)
      bad(site, "staged tuning split must be 0, 1, 2, 4 or 8, got " + std::to_string(tune.split));
    if (tune.tx != 0 && tune.tx != 8 && tune.tx != 16 && tune.tx != 32)
      bad(site, "staged tuning tx must be 0, 8, 16 or 32, got " + std::to_string(tune.tx));
    if (tune.prefetch < 0 || tune.prefetch > 2)
      bad(site, "staged tuning prefetch must be 0, 1 (off) or 2 (on), got " + std::to_string(tune.prefetch));
  } else {
    if (tune.unroll != 0 && tune.unroll != 2 && tune.unroll != 4 && tune.unroll != 8 && tune.unroll != 16)
      bad(site, "tuning unroll must be 0, 2, 4, 8 or 16, got " + std::to_string(tune.unroll));
    if (tune.split < 0 || tune.split > kMaxSplit)
      bad(site, "tuning split must be 0..8, got " + std::to_string(tune.split));
    if (tune.tx != 0 || tune.prefetch != 0)
      bad(site, "tuning tx and prefetch apply to the staged kernel only");
  }
  WoqGemvTuning staged_tune = tune;
  if (m != 1 || !force_staged) staged_tune = {};
  if (tune.kernel == WoqGemvKernel::StagedHalf2 && w.bits != 4) staged_tune = {};  // half2 takes 4 bits only
  return staged_tune;
}

// GPTQ words at 4 bits (and 8 bits at batch 1) take the staged kernel where it applies (see its comment).
bool takes_staged(const WoqWeights& w, int64_t m, const WoqGemvTuning& tune) {
  return w.layout != WoqLayout::Awq && tune.kernel != WoqGemvKernel::Rows && (w.bits == 4 || (w.bits == 8 && m == 1));
}


// ---- the mma kernel's launch plan ----

template <DType XT, DType ST>
GemvKernel mma_kernel(int u) {
  return u == 8 ? gemv_gptq_mma_kernel<8, XT, ST> : gemv_gptq_mma_kernel<4, XT, ST>;
}

// What the mma kernel takes (else the built-in choice runs): gptq layouts at 4 bits, whole steps of 32 inputs in
// one group, a device with mma.sync bf16 (sm_80 and later).
// The problems the mma kernel takes (its device rule is cached_plan_mma's). woq_gemv_cuda checked
// woq_gemv_supported already.
bool mma_shape_ok(const WoqWeights& w) {
  return w.layout != WoqLayout::Awq && w.bits == 4 && w.in % 32 == 0 && w.group % 32 == 0;
}

void check_mma_tuning(const WoqGemvTuning& tune) {
  constexpr const char* site = "woq_gemv_cuda";
  if (tune.unroll != 0 && tune.unroll != 4 && tune.unroll != 8)
    bad(site, "mma tuning unroll must be 0, 4 or 8, got " + std::to_string(tune.unroll));
  if (tune.split != 0 && tune.split != 1 && tune.split != 2 && tune.split != 4 && tune.split != 8)
    bad(site, "mma tuning split must be 0, 1, 2, 4 or 8, got " + std::to_string(tune.split));
  if (tune.tx != 0 || tune.prefetch != 0) bad(site, "mma tuning takes unroll and split only");
}

// U (steps of 4 qweight rows a warp has in flight) and the cluster split: the tuned ones where given, else the
// cheapest by mma_cost (woq_cuda_plan.h), a rough model to be fitted on the H200 sweep (woq_cuda_bench.py --mma).
StagedPlan plan_mma(const WoqWeights& w, DType x_dtype, const WoqGemvTuning& tune) {
  constexpr const char* site = "woq_gemv_cuda";
  const int64_t steps = w.in / 32, tiles = (w.out + kMmaCols - 1) / kMmaCols;
  StagedPlan best;
  double best_cost = 0.0;
  with_half_dtype(x_dtype, site, "x", [&](auto xt) {
    with_half_dtype(w.scale_dtype, site, "scales", [&](auto sd) {
      constexpr DType XT = decltype(xt)::value, SD = decltype(sd)::value;
      for (int u : {4, 8}) {
        if (tune.unroll != 0 && u != tune.unroll) continue;
        const GemvKernel k = mma_kernel<XT, SD>(u);
        const GpuShape gs = gpu_shape(reinterpret_cast<const void*>(k));
        for (int split = 1; split <= gs.max_split; split *= 2) {
          if (tune.split != 0 && split != forced_split(reinterpret_cast<const void*>(k), tune.split))
            continue;
          if (tune.split == 0 && !mma_auto_admits(steps, split)) break;
          const double cost = mma_cost(steps, tiles, gs.sms, gs.per_sm, u, split);
          if (!best.kernel || cost < best_cost * (1.0 - 1e-9)) {
            best.kernel = k;
            best.split = split;
            best.tiles = tiles;
            best.u = u;
            best_cost = cost;
          }
        }
      }
    });
  });
  return best;
}

// plan_mma asked once per problem and tuning (as cached_plan_staged: the op runs at every decode step and inside
// CUDA graph capture); a null kernel on a device without the instruction (before sm_80).
StagedPlan cached_plan_mma(const WoqWeights& w, DType x_dtype, const WoqGemvTuning& tune) {
  const std::string key = std::to_string(w.in) + ":" + std::to_string(w.out) + ":" + std::to_string(w.group) + ":" +
                          std::to_string(static_cast<int>(x_dtype)) + ":" +
                          std::to_string(static_cast<int>(w.scale_dtype)) + ":" + std::to_string(tune.unroll) +
                          ":" + std::to_string(tune.split);
  return plan_once(key, [&](int device) {
    int major = 0;
    check_launch("woq_gemv_cuda", cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 8 ? plan_mma(w, x_dtype, tune) : StagedPlan{};
  });
}
}  // namespace

void woq_check(const WoqWeights& w, const char* site) {
  if (!w.qweight || !w.qzeros || !w.scales) bad(site, "qweight, qzeros and scales are required");
  if (w.layout == WoqLayout::Awq) {
    if (w.bits != 4) bad(site, "layout awq packs 4 bits only, got bits " + std::to_string(w.bits));
  } else if (w.bits != 2 && w.bits != 4 && w.bits != 8) {
    bad(site, "bits must be 2, 4 or 8, got " + std::to_string(w.bits));
  }
  if (w.in <= 0 || w.out <= 0) bad(site, "empty weight");
  if (w.group <= 0) bad(site, "group size must be positive, got " + std::to_string(w.group));
  if (w.layout == WoqLayout::Awq && w.out % 8 != 0)
    bad(site, "awq needs out_features a multiple of 8, got " + std::to_string(w.out));
  if (w.scale_dtype != DType::F16 && w.scale_dtype != DType::BF16 && w.scale_dtype != DType::F32)
    bad(site, "scales dtype must be F16, BF16 or F32, got " + std::string(dtype_name(w.scale_dtype)));
  if (w.in > (int64_t{1} << 31) || w.out > (int64_t{1} << 31)) bad(site, "weight too large");
}

bool woq_gemv_supported(const WoqWeights& w, DType x_dtype, int64_t m, const void* x) {
  if (m < 1 || m > kWoqGemvMaxRows) return false;
  if (x_dtype != DType::F16 && x_dtype != DType::BF16) return false;
  if (w.scale_dtype != DType::F16 && w.scale_dtype != DType::BF16) return false;
  if (w.in % 8 != 0 || !aligned(x, 16) || !aligned(w.qweight, 16)) return false;
  if (w.in * kWoqGemvMaxRows >= (int64_t{1} << 31)) return false;  // 32-bit offsets into x
  if (w.layout == WoqLayout::Awq)
    return w.out % 32 == 0 && aligned(w.qzeros, 16) && aligned(w.scales, 16);
  const int64_t pf = 32 / w.bits;
  return w.out % 4 == 0 && w.in % pf == 0 && w.group % pf == 0 && aligned(w.scales, 8) && aligned(w.qzeros, 4);
}

bool woq_gemv_fuses_hadamard(const WoqWeights& w, DType x_dtype, int64_t m, const void* x,
                             const WoqInputHadamard& rot, const WoqGemvTuning& tune) {
  if (tune.kernel == WoqGemvKernel::Mma) return false;  // the mma variant never rotates: the caller runs two ops
  if (!woq_gemv_supported(w, x_dtype, m, x) || m > 4 || w.bits != 4 || rot.n <= 0 || w.in % rot.n != 0) return false;
  const WoqGemvTuning staged_tune = checked_staged_tuning(w, m, tune);
  return takes_staged(w, m, tune) && staged_plan_for(w, x_dtype, m, staged_tune, rot.n).kernel != nullptr;
}

// The GEMV arguments every kernel shares; rows are GPTQ's qweight rows (AWQ's launch sets its own), split 1.
GemvArgs gemv_args(const WoqWeights& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* out) {
  GemvArgs a{};
  a.qweight = w.qweight;
  a.qzeros = w.qzeros;
  a.scales = w.scales;
  a.x = x;
  a.bias = bias;
  a.bias_f32 = bias_dtype == DType::F32;
  a.out = out;
  a.in = w.in;
  a.out_features = w.out;
  a.group = w.group;
  a.m = static_cast<int>(m);
  a.split = 1;
  a.zero_add = w.layout == WoqLayout::Gptq ? 1.0f : 0.0f;
  a.rows = w.in * w.bits / 32;
  a.zwords = zwords_of(w);
  return a;
}

void woq_gemv_cuda(const WoqWeights& w, DType x_dtype, const void* x, int64_t m, const void* bias, DType bias_dtype,
                   void* out, void* stream, WoqGemvTuning tune, const WoqInputHadamard* rot) {
  constexpr const char* site = "woq_gemv_cuda";
  woq_check(w, site);
  if (!x || !out) bad(site, "x and out are required");
  if (bias && bias_dtype != x_dtype && bias_dtype != DType::F32)
    bad(site, "bias dtype must be x's or F32, got " + std::string(dtype_name(bias_dtype)));
  if (!woq_gemv_supported(w, x_dtype, m, x)) bad(site, "this problem needs the dequantize path");
  if (tune.kernel == WoqGemvKernel::Mma) {
    check_mma_tuning(tune);
    if (rot) bad(site, "rot: the mma variant does not rotate x (see woq_gemv_fuses_hadamard)");
    const StagedPlan plan = mma_shape_ok(w) ? cached_plan_mma(w, x_dtype, tune) : StagedPlan{};
    if (plan.kernel) {
      launch_staged(plan, gemv_args(w, x, m, bias, bias_dtype, out), static_cast<cudaStream_t>(stream));
      return;
    }
    tune = {};  // elsewhere the built-in choice, as the half2 variant does
  }
  const WoqGemvTuning staged_tune = checked_staged_tuning(w, m, tune);
  const bool force_staged = tune.kernel == WoqGemvKernel::Staged || tune.kernel == WoqGemvKernel::StagedHalf2;
  if (rot && rot->n <= 0) bad(site, "rot: block size n must be positive, got " + std::to_string(rot->n));
  StagedPlan plan;
  if (takes_staged(w, m, tune)) plan = staged_plan_for(w, x_dtype, m, staged_tune, rot ? rot->n : 0);
  if (rot && (w.in % rot->n != 0 || !plan.kernel))
    bad(site, "rot: this problem's GEMV cannot rotate x (see woq_gemv_fuses_hadamard)");
  // Rows kernel, batch-1 defaults from the H200 sweep (woq_cuda_bench.py --sweep, docs/performance.md): GPTQ words
  // at 4 and 8 bits run best with 4 loads in flight and 2 blocks per cluster on the 8B shapes (geometric mean 1.59x / 1.21x bf16
  // against 1.25x / 0.91x for 8 and the occupancy-chosen split); AWQ keeps 8 and the chosen split.
  const bool gptq48 = w.layout != WoqLayout::Awq && (w.bits == 4 || w.bits == 8);
  // A staged setting that cannot take the problem falls back to the rows kernel's own defaults.
  const bool rows_tuned = !force_staged;
  const int unroll = m != 1 ? kBatch : rows_tuned && tune.unroll != 0 ? tune.unroll : gptq48 ? 4 : kBatch;
  const int split = m != 1 ? 0 : rows_tuned && tune.split != 0 ? tune.split : gptq48 ? 2 : 0;
  GemvArgs a = gemv_args(w, x, m, bias, bias_dtype, out);  // rows: gptq's (the awq branch below sets its own)
  if (rot) {
    a.rot_n = static_cast<int>(rot->n);
    a.rot_signs = rot->signs;
    a.rot_signs_first = rot->signs_first;
    a.rot_scale = transform::gpu::fwht_scale<float>(rot->n);
  }
  const auto st = static_cast<cudaStream_t>(stream);
  if (plan.kernel) {
    launch_staged(plan, a, st);
    return;
  }
  with_half_dtype(x_dtype, site, "x", [&](auto xt) {
    with_half_dtype(w.scale_dtype, site, "scales", [&](auto sd) {
      constexpr DType XT = decltype(xt)::value, SD = decltype(sd)::value;
      if (w.layout == WoqLayout::Awq) {
        a.rows = w.in;
        a.zwords = w.out / 8;
        const int64_t tiles = (w.out + kAwqCols - 1) / kAwqCols;
        with_rows(m, [&](auto mt) {
          constexpr int MT = decltype(mt)::value;
          constexpr int WORDS = MT <= 2 ? 2 : 1;
          with_unroll<MT>(unroll, [&](auto u) {
            launch_gemv(gemv_awq_kernel<MT, WORDS, decltype(u)::value, XT, SD>, a, tiles, kThreads / (16 / WORDS), st,
                        split);
          });
        });
        return;
      }
      const int64_t tiles = (w.out + kGptqCols - 1) / kGptqCols;
      with_bits(w.bits, [&](auto bits) {
        with_rows(m, [&](auto mt) {
          constexpr int MT = decltype(mt)::value;
          with_unroll<MT>(unroll, [&](auto u) {
            launch_gemv(gemv_gptq_kernel<decltype(bits)::value, MT, decltype(u)::value, XT, SD>, a, tiles,
                        kThreads / kGptqTx, st, split);
          });
        });
      });
    });
  });
}

void woq_dequantize_cuda(const WoqWeights& w, DType out_dtype, void* dst, void* stream) {
  constexpr const char* site = "woq_dequantize_cuda";
  woq_check(w, site);
  if (!dst) bad(site, "dst is required");
  DequantArgs a{};
  a.qweight = w.qweight;
  a.qzeros = w.qzeros;
  a.scales = w.scales;
  a.dst = dst;
  a.in = w.in;
  a.out_features = w.out;
  a.group = w.group;
  a.zero_add = w.layout == WoqLayout::Gptq ? 1.0f : 0.0f;
  const auto st = static_cast<cudaStream_t>(stream);
  constexpr int64_t kMaxGridY = 65535;
  with_float_dtype(w.scale_dtype, site, "scales", [&](auto sd) {
    with_float_dtype(out_dtype, site, "dst", [&](auto ot) {
      constexpr DType SD = decltype(sd)::value, OT = decltype(ot)::value;
      if (w.layout == WoqLayout::Awq) {
        a.rows = w.in;
        a.zwords = w.out / 8;
        const dim3 grid(static_cast<unsigned>((w.out / 8 + kThreads - 1) / kThreads),
                        static_cast<unsigned>(std::min(w.in, kMaxGridY)));
        dequant_awq_kernel<SD, OT><<<grid, kThreads, 0, st>>>(a);
        return;
      }
      a.rows = (w.in * w.bits + 31) / 32;  // the last word row may hold padded inputs, never written
      a.zwords = zwords_of(w);
      const dim3 grid(static_cast<unsigned>((w.out + kThreads - 1) / kThreads),
                      static_cast<unsigned>(std::min(a.rows, kMaxGridY)));
      with_bits(w.bits, [&](auto bits) { dequant_gptq_kernel<decltype(bits)::value, SD, OT><<<grid, kThreads, 0, st>>>(a); });
    });
  });
  check_launch(site);
}

}  // namespace fastround::infer::gpu
