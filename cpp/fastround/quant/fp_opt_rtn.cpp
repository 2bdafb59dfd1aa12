#include "fastround/quant/fp_opt_rtn.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/pack/pack_fp.h"
#include "fastround/quant/fp_numerics.h"

namespace fastround {

using namespace fpq;

namespace {

constexpr int kGroup = 32;
constexpr int kHalf = kGroup / 2;
constexpr float kSmall = 1e-30f;  // upstream's `imatrix <= 1e-30` on an fp32 tensor

void check_args(DType src, const MxfpLayout& L, const float* imatrix) {
  require_float_source(src, "mx_opt_rtn");
  mxfp_layout(L.rows, L.cols, L.bits, "weight");
  if (imatrix != nullptr)
    for (int64_t c = 0; c < L.cols; ++c)
      if (!std::isfinite(imatrix[c]))
        throw OptionError("[mxfp] imatrix: entry " + std::to_string(c) + " is not finite");
}

// |w| + sqrt(sum(w^2) / 32): the weights a mostly-zero imatrix group falls back to (bits > 3).
void weights_from_row(const float* x, float* qw) {
  float sq[kGroup];
  for (int i = 0; i < kGroup; ++i) sq[i] = x[i] * x[i];
  const float av = std::sqrt(torch_sum_lanes8<kGroup>(sq) / static_cast<float>(kGroup));
  for (int i = 0; i < kGroup; ++i) qw[i] = std::fabs(x[i]) + av;
}

// ---- reference: whole-tensor passes in upstream's order ----

// qw [rows * cols]: the imatrix broadcast over rows, then _imatrix_handle_zero over all [rows * cols / 32, 32].
std::vector<float> reference_weights(const std::vector<float>& x, const MxfpLayout& L, const float* imatrix) {
  const int64_t n = L.rows * L.cols, groups = n / kGroup;
  std::vector<float> qw(static_cast<size_t>(n));
  for (int64_t r = 0; r < L.rows; ++r) std::copy_n(imatrix, L.cols, qw.begin() + r * L.cols);
  if (*std::min_element(qw.begin(), qw.end()) != 0.0f) return qw;
  std::vector<int> small(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g)
    small[g] = static_cast<int>(std::count_if(qw.begin() + g * kGroup, qw.begin() + (g + 1) * kGroup,
                                              [](float v) { return v <= kSmall; }));
  for (int64_t g = 0; g < groups; ++g)
    if (small[g] > kHalf) weights_from_row(&x[g * kGroup], &qw[g * kGroup]);
  if (std::none_of(small.begin(), small.end(), [](int c) { return c > 0 && c <= kHalf; })) return qw;
  std::vector<float> mean(static_cast<size_t>(groups));  // all means first: torch computes them before the fill
  for (int64_t g = 0; g < groups; ++g)
    mean[g] = torch_sum_lanes8<kGroup>(&qw[g * kGroup]) / static_cast<float>(kGroup - small[g]);
  for (int64_t i = 0; i < n; ++i)
    if (qw[i] == 0.0f) qw[i] = mean[i / kGroup];
  return qw;
}

// ---- fast path: the same rule decided once per column group, applied per row group ----

struct ColumnRule {
  bool fix = false;        // some entry is exactly 0
  bool mean_fill = false;  // some group has 1..16 entries <= 1e-30
  std::vector<int> small;  // [cols / 32] entries <= 1e-30
};

ColumnRule column_rule(const float* imatrix, int64_t cols) {
  ColumnRule R;
  R.fix = *std::min_element(imatrix, imatrix + cols) == 0.0f;
  if (!R.fix) return R;
  R.small.resize(static_cast<size_t>(cols / kGroup));
  for (int64_t k = 0; k < cols / kGroup; ++k) {
    int c = 0;
    for (int i = 0; i < kGroup; ++i) c += imatrix[k * kGroup + i] <= kSmall;
    R.small[k] = c;
    R.mean_fill = R.mean_fill || (c > 0 && c <= kHalf);
  }
  return R;
}

// Loss weights of column group k for one row's values x[32].
void group_weights(const ColumnRule& R, const float* imatrix, int64_t k, const float* x, float* qw) {
  if (R.fix && R.small[k] > kHalf)
    weights_from_row(x, qw);
  else
    std::copy_n(imatrix + k * kGroup, kGroup, qw);
  if (!R.mean_fill) return;
  const float mean = torch_sum_lanes8<kGroup>(qw) / static_cast<float>(kGroup - R.small[k]);
  for (int i = 0; i < kGroup; ++i)
    if (qw[i] == 0.0f) qw[i] = mean;
}

template <int BITS>
void rows_parallel(DType src, const void* w, const MxfpLayout& L, const float* imatrix, uint8_t* codes,
                   uint8_t* scale) {
  const ColumnRule R = imatrix != nullptr ? column_rule(imatrix, L.cols) : ColumnRule{};
  const int64_t groups = L.cols / kGroup;
  parallel_for(L.rows, [&](int64_t r) {
    std::vector<float> x(static_cast<size_t>(L.cols));
    load_as_float(src, w, r * L.cols, L.cols, x.data());
    float qw[kGroup];
    for (int64_t k = 0; k < groups; ++k) {
      const float* xg = x.data() + k * kGroup;
      if (imatrix != nullptr) group_weights(R, imatrix, k, xg, qw);
      mx_group<BITS>(xg, src, true, codes + r * L.cols + k * kGroup, scale + r * groups + k,
                     imatrix != nullptr ? qw : nullptr);
    }
  });
}

}  // namespace

void mx_opt_rtn_ref(DType src, const void* w, const MxfpLayout& L, const float* imatrix, uint8_t* codes,
                    uint8_t* scale) {
  check_args(src, L, imatrix);
  const int64_t n = L.rows * L.cols;
  std::vector<float> qw;
  if (imatrix != nullptr) {
    std::vector<float> x(static_cast<size_t>(n));
    load_as_float(src, w, 0, n, x.data());
    qw = reference_weights(x, L, imatrix);
  }
  std::vector<uint8_t> weight(static_cast<size_t>(L.weight_bytes()));
  quantize_mxfp_weighted_ref(src, w, L, true, imatrix != nullptr ? qw.data() : nullptr, weight.data(), scale);
  if (L.bits == 4)
    unpack_e2m1_ref(weight.data(), n, codes);
  else
    std::copy(weight.begin(), weight.end(), codes);
}

void mx_opt_rtn(DType src, const void* w, const MxfpLayout& L, const float* imatrix, uint8_t* codes, uint8_t* scale) {
  check_args(src, L, imatrix);
  if (L.bits == 4)
    rows_parallel<4>(src, w, L, imatrix, codes, scale);
  else
    rows_parallel<8>(src, w, L, imatrix, codes, scale);
}

}  // namespace fastround
