#include "fastround/infer/woq_gemm.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"
#include "fastround/infer/woq_simd.h"

namespace fastround::infer {

namespace {

using detail::GemvCtx;
using detail::WoqKernels;

const WoqKernels* kernels(Isa isa) {
#if defined(__x86_64__)
  switch (woq_isa(isa)) {
    case Isa::Avx512: return &detail::kWoqAvx512;
    case Isa::Avx2: return &detail::kWoqAvx2;
    default: return nullptr;
  }
#else
  (void)isa;
  return nullptr;
#endif
}

void require_isa(Isa isa, const char* site) {
  if (!cpu_supports(isa))
    throw OptionError(std::string("[") + site + "] this CPU cannot run the " + isa_name(isa) + " kernels");
}

// The per-group algorithm element by element: the scalar ISA's whole layer and the vector paths' last outputs.
void scalar_block(const WoqWeightView& w, const GemvCtx& c, int64_t o0, int64_t o1, int64_t g0, int64_t g1, float* y) {
  for (int64_t r = 0; r < c.m; ++r) {
    const float* x = c.x + r * c.ld;
    for (int64_t o = o0; o < o1; ++o) {
      float yo = 0.0f;
      for (int64_t g = g0; g < g1; ++g) {
        float acc = 0.0f;
        const int64_t k1 = std::min((g + 1) * w.group, w.in);
        for (int64_t k = g * w.group; k < k1; ++k) acc += x[k] * static_cast<float>(woq_code(w, k, o));
        yo += woq_scale(w, g, o) * (acc - static_cast<float>(woq_zero(w, g, o)) * c.xsum[r * w.groups + g]);
      }
      y[r * w.out + o] += yo;
    }
  }
}

// fp32 sum of x[0, n) over 16 interleaved partial sums: independent add chains (a sum in k order is a chain of n
// dependent adds, 14336 of them for a down projection: the largest serial cost of a decode call).
float group_sum(const float* x, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += x[i + l];
  for (; i < n; ++i) acc[i % 16] += x[i];
  for (int width = 8; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

}  // namespace

Isa woq_isa(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa != Isa::Scalar && !__builtin_cpu_supports("fma")) return Isa::Scalar;
#endif
  return isa;
}

bool woq_gemv_fast(const WoqWeightView& w, Isa isa) {
  const WoqKernels* k = cpu_supports(isa) ? kernels(isa) : nullptr;
  return k && k->block_outputs(w) > 0 && k->block_outputs(w) <= w.out;
}

void woq_linear_ref(const WoqWeightView& w, const WoqGemvArgs& a) {
  std::vector<float> x(static_cast<size_t>(w.in)), y(static_cast<size_t>(w.out));
  for (int64_t r = 0; r < a.m; ++r) {
    load_as_float(a.dtype, a.x, r * w.in, w.in, x.data());
    for (int64_t o = 0; o < w.out; ++o) {
      float acc = 0.0f;
      for (int64_t k = 0; k < w.in; ++k) acc += x[k] * woq_weight(w, k, o);
      y[o] = a.bias ? acc + a.bias[o] : acc;
    }
    store_from_float(a.dtype, y.data(), w.out, a.y, r * w.out);
  }
}

void woq_gemv(const WoqWeightView& w, const WoqGemvArgs& a, Isa isa) {
  require_isa(isa, "woq_gemv");
  const WoqKernels* k = kernels(isa);
  const int64_t m = a.m, out = w.out;
  if (m <= 0) return;
  // x in fp32, zero past `in` up to every input a GPTQ qweight row packs; sums per group.
  GemvCtx c;
  c.m = m;
  c.ld = w.layout == WoqLayout::Awq ? w.in : w.qweight_rows() * w.pack_factor();
  std::unique_ptr<float[]> xf(new float[static_cast<size_t>(m * c.ld)]);
  std::vector<float> xsum(static_cast<size_t>(m * w.groups));
  for (int64_t r = 0; r < m; ++r) {
    float* xr = xf.get() + r * c.ld;
    load_as_float(a.dtype, a.x, r * w.in, w.in, xr);
    std::fill(xr + w.in, xr + c.ld, 0.0f);
    for (int64_t g = 0; g < w.groups; ++g)
      xsum[r * w.groups + g] = group_sum(xr + g * w.group, std::min((g + 1) * w.group, w.in) - g * w.group);
  }
  c.x = xf.get();
  c.xsum = xsum.data();

  // bf16 decode rows on AVX512_BF16: pairs of codes against pairs of x (woq_simd.h, GemvBf16Ctx), x's own bf16 bits.
  detail::GemvBf16Ctx bc;
  std::vector<uint32_t> xpair;
  const int pf = w.pack_factor();
  const bool bf16_pairs = k == &detail::kWoqAvx512 && a.dtype == DType::BF16 && m <= 2 && w.layout != WoqLayout::Awq &&
                          w.bits <= 4 && w.group % pf == 0 && detail::gptq_bf16_block_outputs(w) > 0;
  if (bf16_pairs) {
    const int hp = pf / 2;
    bc.ld2 = c.ld / 2;
    bc.m = m;
    bc.xsum = c.xsum;
    xpair.resize(static_cast<size_t>(m * bc.ld2));
    const int64_t full = w.in / pf;  // words whose inputs are all real
    for (int64_t r = 0; r < m; ++r) {
      const uint16_t* xb = static_cast<const uint16_t*>(a.x) + r * w.in;
      uint32_t* xp = xpair.data() + r * bc.ld2;
      for (int64_t kw = 0; kw < full; ++kw)
        for (int j = 0; j < hp; ++j)
          xp[kw * hp + j] = static_cast<uint32_t>(xb[kw * pf + j]) | static_cast<uint32_t>(xb[kw * pf + j + hp]) << 16;
      for (int64_t kw = full; kw < c.ld / pf; ++kw)
        for (int j = 0; j < hp; ++j) {
          const int64_t k0 = kw * pf + j, k1 = k0 + hp;
          xp[kw * hp + j] = static_cast<uint32_t>(k0 < w.in ? xb[k0] : 0) |
                            static_cast<uint32_t>(k1 < w.in ? xb[k1] : 0) << 16;
        }
    }
    bc.xpair = xpair.data();
  }
  const int64_t blk = bf16_pairs ? detail::gptq_bf16_block_outputs(w) : k ? k->block_outputs(w) : 0;
  const int64_t nvec = blk ? out / blk : 0, tail0 = nvec * blk;
  const int64_t nblocks = nvec + (tail0 < out ? 1 : 0);
  // Few output blocks (k/v projections, many threads) also split the groups; the split follows the shape
  // only, and partial sums add in split order, so the result is the same at every thread count.
  constexpr int64_t kTargetTasks = 64;
  int64_t per_split = w.groups;
  if (nblocks < kTargetTasks) {
    const int64_t want = std::min(w.groups, (kTargetTasks + nblocks - 1) / nblocks);
    per_split = (w.groups + want - 1) / want;
  }
  const int64_t splits = (w.groups + per_split - 1) / per_split;
  std::vector<float> part(static_cast<size_t>(splits * m * out), 0.0f);  // [splits, m, out]
  parallel_for(nblocks * splits, [&](int64_t t) {
    const int64_t b = t / splits, s = t % splits;
    const int64_t g0 = s * per_split, g1 = std::min(w.groups, g0 + per_split);
    float* y = part.data() + s * m * out;
    if (b < nvec && bf16_pairs) detail::gptq_bf16_block(w, bc, b * blk, g0, g1, y);
    else if (b < nvec) k->gemv_block(w, c, b * blk, g0, g1, y);
    else scalar_block(w, c, tail0, out, g0, g1, y);
  });
  std::vector<float> row(static_cast<size_t>(out));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      float v = part[r * out + o];
      for (int64_t s = 1; s < splits; ++s) v += part[(s * m + r) * out + o];
      row[o] = a.bias ? v + a.bias[o] : v;
    }
    store_from_float(a.dtype, row.data(), out, a.y, r * out);
  }
}

void woq_dequantize_ref(const WoqWeightView& w, DType dtype, void* dst) {
  if (dtype != DType::F32 && dtype != DType::BF16)
    throw OptionError("[woq_dequantize] dtype must be F32 or BF16, got " + std::string(dtype_name(dtype)));
  for (int64_t o = 0; o < w.out; ++o)
    for (int64_t k = 0; k < w.in; ++k) {
      const float v = woq_weight(w, k, o);
      if (dtype == DType::BF16) static_cast<uint16_t*>(dst)[o * w.in + k] = float_to_bf16(v);
      else static_cast<float*>(dst)[o * w.in + k] = v;
    }
}

void woq_dequantize(const WoqWeightView& w, DType dtype, void* dst, Isa isa) {
  if (dtype != DType::F32 && dtype != DType::BF16)
    throw OptionError("[woq_dequantize] dtype must be F32 or BF16, got " + std::string(dtype_name(dtype)));
  require_isa(isa, "woq_dequantize");
  const WoqKernels* k = kernels(isa);
  if (k == &detail::kWoqAvx512 && detail::gptq_dequantize_avx512(w, dtype, dst)) return;
  if (k && k->dequantize(w, dtype, dst)) return;
  // Layers the vector kernels do not serve: the reference's values, rows in parallel.
  parallel_for(w.out, [&](int64_t o) {
    for (int64_t k = 0; k < w.in; ++k) {
      const float v = woq_weight(w, k, o);
      if (dtype == DType::BF16) static_cast<uint16_t*>(dst)[o * w.in + k] = float_to_bf16(v);
      else static_cast<float*>(dst)[o * w.in + k] = v;
    }
  });
}

}  // namespace fastround::infer
