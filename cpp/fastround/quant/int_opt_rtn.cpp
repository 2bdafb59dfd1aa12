#include "fastround/quant/int_opt_rtn.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/half.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/simd.h"

namespace fastround {

namespace {

// ---- torch CPU sums (ATen SumKernel.cpp, contiguous inner reduction) ----

// torch 2.13's fp32 sum runs 8-lane vectors (measured against torch.sum on AVX2 and AVX-512 hosts).
constexpr int kLanes = 8;

template <int W>
struct Lanes {
  float v[W];
};

int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

// multi_row_sum: `size` rows of 4 W-lane vectors (row i, column k at x + (i*4 + k)*W) summed through a 4-level
// cascade of 16-row chunks, so that only partial sums of similar size meet.
template <int W>
void multi_row_sum(const float* x, int64_t size, Lanes<W> out[4]) {
  constexpr int kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  Lanes<W> acc[kLevels][4] = {};
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k].v[l] += x[(i * 4 + k) * W + l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k].v[l] += acc[j - 1][k].v[l];
          acc[j - 1][k].v[l] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k].v[l] += acc[j][k].v[l];
  for (int k = 0; k < 4; ++k) out[k] = acc[0][k];
}

// row_sum: `size` W-lane vectors at x, four interleaved partial sums folded in order.
template <int W>
Lanes<W> row_sum(const float* x, int64_t size) {
  const int64_t size_ilp = size / 4;
  Lanes<W> p[4];
  multi_row_sum<W>(x, size_ilp, p);
  for (int64_t i = size_ilp * 4; i < size; ++i)
    for (int l = 0; l < W; ++l) p[0].v[l] += x[i * W + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) p[0].v[l] += p[k].v[l];
  return p[0];
}

// The lanes' sums, then the scalar tail and the lanes in order (vectorized_inner_sum).
float finish_inner_sum(const Lanes<kLanes>& acc, const float* tail, int64_t tail_n) {
  float f = 0.0f;
  for (int64_t k = 0; k < tail_n; ++k) f += tail[k];
  for (int l = 0; l < kLanes; ++l) f += acc.v[l];
  return f;
}

// torch.sum of a bf16 / fp16 run (float accumulation; the caller rounds to the dtype): each 16-element vector
// folds to 8 lanes first, bf16 as (x[l] + x[8 + l]), fp16 pairwise (0 + x[2l]) + x[2l + 1] (ATen's load policies).
float torch_sum_reduced(DType dt, const float* x, int64_t n) {
  if (dt == DType::F32) return torch_sum_f32(x, n);
  if (n < 16) return row_sum<1>(x, n).v[0];
  const int64_t vs = n / 16;
  std::vector<float> folded(static_cast<size_t>(vs * kLanes));
  for (int64_t i = 0; i < vs; ++i)
    for (int l = 0; l < kLanes; ++l)
      folded[i * kLanes + l] = dt == DType::BF16 ? x[16 * i + l] + x[16 * i + 8 + l]
                                                 : (0.0f + x[16 * i + 2 * l]) + x[16 * i + 2 * l + 1];
  return finish_inner_sum(row_sum<kLanes>(folded.data(), vs), x + vs * 16, n - vs * 16);
}

// ---- upstream's elementwise numerics ----

inline float clamp_nan(float v, float lo, float hi) { return std::isnan(v) ? v : std::min(std::max(v, lo), hi); }

// get_reciprocal: 1/x rounded to the dtype where |x| >= eps (1e-5 for fp16, else 1e-30, as that dtype holds
// it), else 0.
inline float reciprocal(DType dt, float x) {
  const float eps = round_to_dtype(dt, dt == DType::F16 ? 1e-5f : 1e-30f);
  return std::fabs(x) >= eps ? round_to_dtype(dt, 1.0f / x) : 0.0f;
}

// The scale floor: where(scale < 0, clamp(scale, max=-thresh), clamp(scale, min=thresh)) in the dtype.
inline float floor_scale(DType dt, float s, float thresh) {
  const float thr = round_to_dtype(dt, thresh);
  if (std::isnan(s)) return s;
  return s < 0.0f ? std::min(s, -thr) : std::max(s, thr);
}

struct Grid {
  int half;     // candidates k = -half..half besides the first
  double step;  // the Python float step
};

Grid search_grid(int bits) {
  if (bits == 2) return {90, 0.01};
  const double nmax = static_cast<double>(1 << (bits - 1));
  const double search_min = nmax * 0.75;  // AR_SEARCH_SCALE_RATIO unset
  const double step = search_min / 200.0 * 2.0;
  return {static_cast<int>(search_min / step), step};
}

// -(Q - step*k) * r: the Python float becomes fp32, the product rounds to the dtype.
inline float candidate_iscale(DType dt, float r, int nmax, const Grid& grid, int k) {
  const double d = -(static_cast<double>(nmax) - grid.step * static_cast<double>(k));
  return round_to_dtype(dt, static_cast<float>(d) * r);
}

// Squared (weighted) error of each element for one candidate, as upstream's loss tensor holds it.
void loss_elements(DType dt, const float* x, const float* w, int64_t n, float iscale, float scale, float nmax,
                   float* sq) {
  for (int64_t i = 0; i < n; ++i) sq[i] = opt_rtn_loss_element(dt, x[i], w ? w + i : nullptr, iscale, scale, nmax);
}

int64_t first_abs_max(const float* x, int64_t n) {
  int64_t imax = 0;
  for (int64_t i = 1; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(x[imax])) imax = i;
  return imax;
}

// The search over one group of n values (x: the weight's values, padding zeros included; w: loss weights or null).
float search_ref(DType dt, const float* x, const float* w, int64_t n, int bits, std::vector<float>& sq) {
  const int nmax = 1 << (bits - 1);
  const float r = reciprocal(dt, x[first_abs_max(x, n)]);
  const float iscale0 = round_to_dtype(dt, static_cast<float>(-nmax) * r);
  float scale = reciprocal(dt, iscale0);
  sq.resize(static_cast<size_t>(n));
  loss_elements(dt, x, w, n, iscale0, scale, static_cast<float>(nmax), sq.data());
  float best = torch_sum_f32(sq.data(), n);
  const Grid grid = search_grid(bits);
  for (int k = -grid.half; k <= grid.half; ++k) {
    if (k == 0) continue;
    const float iscale = candidate_iscale(dt, r, nmax, grid, k);
    const float s = reciprocal(dt, iscale);
    loss_elements(dt, x, w, n, iscale, s, static_cast<float>(nmax), sq.data());
    const float loss = torch_sum_f32(sq.data(), n);
    if (loss < best) {
      best = loss;
      scale = s;
    }
  }
  return scale;
}

// ---- imatrix ----

// _imatrix_handle_zero, decided per column group (every weight row shares the imatrix). It runs only when some
// entry is exactly 0; a group with more than group_size/2 entries <= 1e-30 (Python floor division, so every
// group when group_size is -1) takes weights from its weight row instead, and when any group has 1..group_size/2
// such entries, every exact zero left takes its row's sum / (group - count).
struct ImatrixRule {
  bool any_zero = false;
  bool mean_fill = false;
  std::vector<float> padded;         // [groups * group], the last group padded with 1e-5
  std::vector<int64_t> small_count;  // [groups] entries <= 1e-30
  std::vector<uint8_t> from_weight;  // [groups]
};

ImatrixRule imatrix_rule(const float* imatrix, const IntGrouping& g, bool fix_zero) {
  ImatrixRule R;
  R.padded.assign(static_cast<size_t>(g.cols_p()), 1e-5f);
  std::copy_n(imatrix, g.cols, R.padded.begin());
  R.any_zero = fix_zero && *std::min_element(R.padded.begin(), R.padded.end()) == 0.0f;
  if (!R.any_zero) return R;
  const int64_t half = g.group_size >= 0 ? g.group_size / 2 : (g.group_size - 1) / 2;  // Python's //
  R.small_count.assign(static_cast<size_t>(g.groups), 0);
  R.from_weight.assign(static_cast<size_t>(g.groups), 0);
  for (int64_t k = 0; k < g.groups; ++k) {
    for (int64_t i = 0; i < g.group; ++i) R.small_count[k] += R.padded[k * g.group + i] <= 1e-30f;
    R.from_weight[k] = R.small_count[k] > half;
    R.mean_fill = R.mean_fill || (R.small_count[k] > 0 && R.small_count[k] <= half);
  }
  return R;
}

// Loss weights of group k of one weight row (x: its n values, padding zeros included).
void group_weights(const ImatrixRule& R, DType dt, const float* x, int64_t k, int64_t n, int bits, float* w,
                   std::vector<float>& tmp) {
  std::copy_n(R.padded.data() + k * n, n, w);
  if (!R.any_zero) return;
  if (R.from_weight[k]) {
    if (bits <= 3) {
      for (int64_t i = 0; i < n; ++i) w[i] = std::fabs(x[i]);
    } else {
      // |w| + sqrt(sum(w^2) / 32), each op in the weight's dtype
      tmp.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) tmp[i] = round_to_dtype(dt, x[i] * x[i]);
      const float sigma2 = round_to_dtype(dt, round_to_dtype(dt, torch_sum_reduced(dt, tmp.data(), n)) / 32.0f);
      const float av = round_to_dtype(dt, std::sqrt(sigma2));
      for (int64_t i = 0; i < n; ++i) w[i] = round_to_dtype(dt, std::fabs(x[i]) + av);
    }
  }
  if (R.mean_fill) {
    const float mean = torch_sum_f32(w, n) / static_cast<float>(n - R.small_count[k]);
    for (int64_t i = 0; i < n; ++i)
      if (w[i] == 0.0f) w[i] = mean;
  }
}

// ---- output ----

void store_scale(DType dt, void* scales, int64_t i, float s) {
  switch (dt) {
    case DType::F32: static_cast<float*>(scales)[i] = s; break;
    case DType::BF16: static_cast<uint16_t*>(scales)[i] = float_to_bf16(s); break;
    default: static_cast<uint16_t*>(scales)[i] = float_to_fp16(s); break;
  }
}

// int_w = round(w / scale) (the division in the dtype), clamped; codes are int_w + Q.
void write_codes(DType dt, const float* x, int64_t n, float scale, int bits, uint8_t* codes) {
  const float nmax = static_cast<float>(1 << (bits - 1));
  for (int64_t i = 0; i < n; ++i) {
    const float q = clamp_nan(std::nearbyint(round_to_dtype(dt, x[i] / scale)), -nmax, nmax - 1.0f);
    codes[i] = static_cast<uint8_t>(static_cast<int>(q + nmax));
  }
}

void check_args(DType src, const IntGrouping& g, int bits, const float* imatrix, const OptRtnOptions& opt) {
  require_float_source(src, "int_opt_rtn");
  if (!(opt.scale_thresh > 0.0f) || !std::isfinite(opt.scale_thresh))
    throw OptionError("[int_opt_rtn] scale_thresh must be a positive finite number");
  if (bits < 2 || bits > 8) throw OptionError("[int_opt_rtn] bits must be 2..8, got " + std::to_string(bits));
  if (g.rows <= 0 || g.cols <= 0 || g.group <= 0 || g.groups <= 0 || g.cols_p() < g.cols)
    throw OptionError("[int_opt_rtn] weight: invalid grouping");
  if (imatrix != nullptr)
    for (int64_t c = 0; c < g.cols; ++c)
      if (!std::isfinite(imatrix[c]))
        throw OptionError("[int_opt_rtn] imatrix: entry " + std::to_string(c) + " is not finite");
}

// ---- fast path ----

// The search with the loss elements in vector code. Candidates are precomputed so that a group whose inverse
// scales, scales or weights are not all finite and nonzero (NaN / inf losses, the torch.clamp NaN rule) takes the
// reference; a candidate repeating the previous inverse scale has the previous loss, which cannot beat the best.
float search_fast(const simd::Kernels* K, DType dt, const float* x, const float* w, int64_t n, int bits,
                  const Grid& grid, std::vector<float>& iscales, std::vector<float>& sq) {
  const int nmax = 1 << (bits - 1);
  const float r = reciprocal(dt, x[first_abs_max(x, n)]);
  const int ncand = 2 * grid.half + 1;
  iscales.resize(static_cast<size_t>(ncand));
  iscales[0] = round_to_dtype(dt, static_cast<float>(-nmax) * r);
  for (int k = -grid.half, j = 1; k <= grid.half; ++k)
    if (k != 0) iscales[j++] = candidate_iscale(dt, r, nmax, grid, k);
  bool proven = std::isfinite(r) && r != 0.0f;
  for (int j = 0; proven && j < ncand; ++j) {
    const float s = reciprocal(dt, iscales[j]);
    proven = std::isfinite(iscales[j]) && std::isfinite(s) && s != 0.0f;
  }
  for (int64_t i = 0; proven && w != nullptr && i < n; ++i) proven = std::isfinite(w[i]);
  if (!proven) return search_ref(dt, x, w, n, bits, sq);
  sq.resize(static_cast<size_t>(n));
  auto loss_of = [&](float iscale, float s) {
    if (K != nullptr) return K->int_search_loss(x, w, n, dt, iscale, s, static_cast<float>(nmax), sq.data());
    loss_elements(dt, x, w, n, iscale, s, static_cast<float>(nmax), sq.data());
    return torch_sum_f32(sq.data(), n);
  };
  float scale = reciprocal(dt, iscales[0]);
  float best = loss_of(iscales[0], scale);
  for (int j = 1; j < ncand; ++j) {
    if (iscales[j] == iscales[j - 1]) continue;
    const float s = reciprocal(dt, iscales[j]);
    const float loss = loss_of(iscales[j], s);
    if (loss < best) {
      best = loss;
      scale = s;
    }
  }
  return scale;
}

}  // namespace

float torch_sum_f32(const float* x, int64_t n) {
  if (n < kLanes) return row_sum<1>(x, n).v[0];
  const int64_t vs = n / kLanes;
  if (vs / 4 >= 16) return finish_inner_sum(row_sum<kLanes>(x, vs), x + vs * kLanes, n - vs * kLanes);
  // Below one 16-row chunk (groups up to 511 values) the cascade levels stay +0 and adding them changes no sum
  // (partial sums start at +0, so none is -0): the same order without the zero adds.
  float p[4][kLanes] = {};
  for (int64_t i = 0; i < vs / 4; ++i)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < kLanes; ++l) p[k][l] += x[(i * 4 + k) * kLanes + l];
  for (int64_t i = vs / 4 * 4; i < vs; ++i)
    for (int l = 0; l < kLanes; ++l) p[0][l] += x[i * kLanes + l];
  Lanes<kLanes> acc;
  for (int l = 0; l < kLanes; ++l) acc.v[l] = ((p[0][l] + p[1][l]) + p[2][l]) + p[3][l];
  return finish_inner_sum(acc, x + vs * kLanes, n - vs * kLanes);
}

void int_opt_rtn_ref(DType src, const void* w, const IntGrouping& g, int bits, const float* imatrix, uint8_t* codes,
                     void* scales, const OptRtnOptions& opt) {
  check_args(src, g, bits, imatrix, opt);
  const ImatrixRule R = imatrix != nullptr ? imatrix_rule(imatrix, g, opt.fix_zero_imatrix) : ImatrixRule{};
  std::vector<float> x(static_cast<size_t>(g.group)), wk(static_cast<size_t>(g.group)), sq, tmp;
  for (int64_t r = 0; r < g.rows; ++r)
    for (int64_t k = 0; k < g.groups; ++k) {
      const int64_t c0 = k * g.group, n = std::min(g.group, g.cols - c0);
      std::fill(x.begin(), x.end(), 0.0f);
      load_as_float(src, w, r * g.cols + c0, n, x.data());
      if (imatrix != nullptr) group_weights(R, src, x.data(), k, g.group, bits, wk.data(), tmp);
      const float s = floor_scale(src, search_ref(src, x.data(), imatrix ? wk.data() : nullptr, g.group, bits, sq),
                                  opt.scale_thresh);
      store_scale(src, scales, r * g.groups + k, s);
      if (codes != nullptr) write_codes(src, x.data(), n, s, bits, codes + r * g.cols + c0);
    }
}

void int_opt_rtn(DType src, const void* w, const IntGrouping& g, int bits, const float* imatrix, uint8_t* codes,
                 void* scales, const OptRtnOptions& opt) {
  check_args(src, g, bits, imatrix, opt);
  const ImatrixRule R = imatrix != nullptr ? imatrix_rule(imatrix, g, opt.fix_zero_imatrix) : ImatrixRule{};
  const simd::Kernels* K = simd::active_kernels();
  const Grid grid = search_grid(bits);
  parallel_for(g.rows, [&](int64_t r) {
    std::vector<float> row(static_cast<size_t>(g.cols_p()), 0.0f), wk(static_cast<size_t>(g.group)), sq, tmp, iscales;
    if (K != nullptr)
      K->load_as_float(src, w, r * g.cols, g.cols, row.data());
    else
      load_as_float(src, w, r * g.cols, g.cols, row.data());
    for (int64_t k = 0; k < g.groups; ++k) {
      const float* x = row.data() + k * g.group;
      if (imatrix != nullptr) group_weights(R, src, x, k, g.group, bits, wk.data(), tmp);
      const float s = floor_scale(
          src, search_fast(K, src, x, imatrix ? wk.data() : nullptr, g.group, bits, grid, iscales, sq),
          opt.scale_thresh);
      store_scale(src, scales, r * g.groups + k, s);
      if (codes != nullptr)
        write_codes(src, x, std::min(g.group, g.cols - k * g.group), s, bits, codes + r * g.cols + k * g.group);
    }
  });
}

}  // namespace fastround
