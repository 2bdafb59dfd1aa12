// Fast Walsh-Hadamard transform over the rows of a [rows, cols] buffer, in place (transforms-and-formats.md §1.2).
//
// Each row is cut into consecutive blocks of n elements (n == cols: full-dimension; n < cols: block-diagonal,
// n | cols) and each block v becomes
//     v <- S_after · T · S_before · v,   T = (H_K ⊗ H_{2^m}) · c,   n = K · 2^m,
// H_{2^m} the Sylvester matrix (H[i][j] = (-1)^popcount(i & j)), H_K a ±1 matrix given by the caller (K = 1: none),
// c = 1/sqrt(n) when normalized, S_* an optional diag(±1). With `transpose` the operator is T^T = (H_K^T ⊗ H_{2^m})·c
// (H_{2^m} is symmetric, only H_K is not). In the element index e = k·2^m + r the butterflies act on r and H_K on k,
// which is upstream's matmul_hadU ordering: applied to a row vector x it returns x·T^T, i.e. T·x here.
//
// Arithmetic (the same in the reference and the fast path, so they agree bit for bit): F32/F16/BF16 blocks are
// transformed in fp32 (half types loaded exactly, stored back with RNE), F64 in fp64; butterfly stages with strides
// 1, 2, ..., 2^(m-1), each (a, b) -> (a + b, a - b); then out[k][r] = sum over k' in increasing order, starting from
// 0, of ±y[k'][r]; then one multiplication by c rounded to the compute type. Signs multiply exactly.
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround::transform {

struct FwhtSpec {
  int64_t n = 0;                  // block length; n | cols, n = k · 2^m
  int64_t k = 1;                  // order of the non-Sylvester factor H_K
  const int8_t* hadk = nullptr;   // [k, k] row-major, entries ±1; required when k > 1
  bool transpose = false;         // apply T^T instead of T
  const int8_t* signs = nullptr;  // [n] entries ±1, or null
  bool signs_first = false;       // signs applied before T (T·D) rather than after (D·T)
  bool normalize = true;          // multiply by 1/sqrt(n)
};

// Checks dtype (F32, F64, F16, BF16), sizes, n | cols, n/k a power of two and the ±1 entries of hadk and signs;
// throws OptionError naming `site` and the option at fault. Both entry points call it before any work.
void fwht_check(DType dtype, const void* x, int64_t rows, int64_t cols, const FwhtSpec& spec, const char* site);

// x [rows, cols] of `dtype`, transformed in place.
void fwht_rows_ref(DType dtype, void* x, int64_t rows, int64_t cols, const FwhtSpec& spec);
// The same result, blocks spread over OpenMP threads (static chunks), the stages written for the vectorizer.
void fwht_rows(DType dtype, void* x, int64_t rows, int64_t cols, const FwhtSpec& spec);

// One n-long fp32 block v, in place, without checks (the caller ran fwht_check): the bodies fwht_rows_ref and
// fwht_rows run on every block, for kernels that fuse the transform with a following step. tmp: n floats when k > 1.
void fwht_block_f32_ref(float* v, float* tmp, const FwhtSpec& spec);
void fwht_block_f32(float* v, float* tmp, const FwhtSpec& spec);

// Largest k in `sizes` (any order) with n % k == 0 and n / k a power of two, 0 if none (the safetensors rule,
// §1.3 a, passes the file's keys; the SpinQuant rule is first-match in its own order: use hadamard_k_first).
int64_t hadamard_k_largest(int64_t n, const int64_t* sizes, int64_t count);
// First k of `sizes` in the given order with n % k == 0 and n / k a power of two, 1 if n is a power of two
// (SpinQuant's get_hadamard_K, §1.3 b), 0 if none.
int64_t hadamard_k_first(int64_t n, const int64_t* sizes, int64_t count);

}  // namespace fastround::transform
