// The fast Walsh-Hadamard kernels (fastround/transform/fwht): for every dtype (F32, F64, BF16, F16), block length
// (powers of two from 1 to 8192 and K·2^m with Paley matrices K = 12, 20, 44 and arbitrary ±1 K = 3, 5), layout
// (full row, block-diagonal), transpose, sign vector before / after, with and without 1/sqrt(n), the OpenMP fast
// path equals the scalar reference bit for bit at 1 and 4 threads; in fp64 both equal the dense product by the
// Kronecker matrix within 1e-12; the Paley K matrices are Hadamard (H·H^T = K·I); bad options throw. Plain C++;
// tests/test_hadamard.py runs it. Ends with "N passed, N failed".
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/transform/fwht.h"
#include "test_harness.h"

namespace fr = fastround;
namespace tf = fastround::transform;

using fastround::test::check;

namespace {

// Paley construction I for a prime q = 3 mod 4: order q + 1, built from the quadratic residues mod q.
std::vector<int8_t> paley(int q) {
  std::vector<int> chi(q, -1);
  chi[0] = 0;
  for (int i = 1; i < q; ++i) chi[(i * i) % q] = 1;
  const int k = q + 1;
  std::vector<int8_t> h(static_cast<size_t>(k * k));
  // Q[i][j] = chi(j - i); H = I + [[0, 1^T], [-1, Q]] (the skew form), every entry ±1.
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      int s;
      if (i == 0) s = j == 0 ? 1 : 1;
      else if (j == 0) s = -1;
      else if (i == j) s = 1;
      else s = chi[((j - i) % q + q) % q];
      h[static_cast<size_t>(i * k + j)] = static_cast<int8_t>(s);
    }
  return h;
}

bool is_hadamard(const std::vector<int8_t>& h, int k) {
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      int dot = 0;
      for (int t = 0; t < k; ++t) dot += h[i * k + t] * h[j * k + t];
      if (dot != (i == j ? k : 0)) return false;
    }
  return true;
}

std::vector<uint8_t> to_bytes(fr::DType dt, const std::vector<double>& v) {
  const size_t es = static_cast<size_t>(fr::dtype_bits(dt) / 8);
  std::vector<uint8_t> out(v.size() * es);
  if (dt == fr::DType::F64) {
    std::memcpy(out.data(), v.data(), out.size());
  } else {
    std::vector<float> f(v.begin(), v.end());
    fr::store_from_float(dt, f.data(), static_cast<int64_t>(f.size()), out.data(), 0);
  }
  return out;
}

// Dense fp64 product: y = S_a · T · S_b · x per block, T = (H_K ⊗ H_L)·c (or its transpose).
std::vector<double> dense(const std::vector<double>& x, int64_t rows, int64_t cols, const tf::FwhtSpec& s) {
  const int64_t n = s.n, len = n / s.k;
  const double c = s.normalize ? 1.0 / std::sqrt(static_cast<double>(n)) : 1.0;
  std::vector<double> y(x.size());
  for (int64_t b = 0; b < rows * cols / n; ++b)
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ki = i / len, ri = i % len, kj = j / len, rj = j % len;
        int hk = 1;
        if (s.k > 1) hk = s.transpose ? s.hadk[kj * s.k + ki] : s.hadk[ki * s.k + kj];
        const int hl = (__builtin_popcountll(static_cast<uint64_t>(ri & rj)) & 1) ? -1 : 1;
        double xj = x[static_cast<size_t>(b * n + j)];
        if (s.signs && s.signs_first) xj *= s.signs[j];
        acc += hk * hl * xj;
      }
      acc *= c;
      if (s.signs && !s.signs_first) acc *= s.signs[i];
      y[static_cast<size_t>(b * n + i)] = acc;
    }
  return y;
}

void run_case(fr::DType dt, int64_t rows, int64_t cols, tf::FwhtSpec s, uint32_t seed, const std::string& name) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> x(static_cast<size_t>(rows * cols));
  for (auto& v : x) v = nd(gen) * (gen() % 7 == 0 ? 30.0 : 1.0);  // a few outliers, as in real weights
  if (!x.empty()) x[0] = -0.0;
  std::vector<int8_t> signs(static_cast<size_t>(s.n));
  for (auto& v : signs) v = (gen() & 1) ? 1 : -1;
  if (s.signs) s.signs = signs.data();
  const std::vector<uint8_t> input = to_bytes(dt, x);
  std::vector<uint8_t> ref = input;
  tf::fwht_rows_ref(dt, ref.data(), rows, cols, s);
  for (int threads : {1, 4}) {
    fr::set_num_threads(threads);
    std::vector<uint8_t> fast = input;
    tf::fwht_rows(dt, fast.data(), rows, cols, s);
    check(fast == ref, name + " fast==ref threads=" + std::to_string(threads));
  }
  if (dt == fr::DType::F64 && s.n <= 512) {
    const std::vector<double> want = dense(x, rows, cols, s);
    const double* got = reinterpret_cast<const double*>(ref.data());
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
    double scale = 0;
    for (double v : x) scale = std::max(scale, std::fabs(v));
    check(worst <= 1e-12 * scale * std::sqrt(static_cast<double>(s.n)), name + " == dense fp64");
  }
}

void expect_throw(const std::string& name, fr::DType dt, int64_t rows, int64_t cols, const tf::FwhtSpec& s) {
  std::vector<double> x(static_cast<size_t>(rows * cols), 1.0);
  bool threw = false;
  try {
    tf::fwht_rows(dt, x.data(), rows, cols, s);
  } catch (const fr::OptionError&) {
    threw = true;
  }
  check(threw, "throws: " + name);
}

}  // namespace

int main() {
  const fr::DType dtypes[] = {fr::DType::F32, fr::DType::F64, fr::DType::BF16, fr::DType::F16};
  const char* dnames[] = {"f32", "f64", "bf16", "f16"};
  std::vector<std::vector<int8_t>> pal;
  for (int q : {11, 19, 43}) {
    pal.push_back(paley(q));
    check(is_hadamard(pal.back(), q + 1), "paley " + std::to_string(q + 1) + " is Hadamard");
  }
  std::mt19937 gen(7);
  std::vector<int8_t> any3(9), any5(25);
  for (auto& v : any3) v = (gen() & 1) ? 1 : -1;
  for (auto& v : any5) v = (gen() & 1) ? 1 : -1;

  struct KCase {
    int64_t k;
    const int8_t* h;
  };
  std::vector<KCase> ks = {{1, nullptr}, {12, pal[0].data()}, {20, pal[1].data()}, {44, pal[2].data()},
                           {3, any3.data()}, {5, any5.data()}};
  uint32_t seed = 1;
  for (int di = 0; di < 4; ++di)
    for (const KCase& kc : ks)
      for (int64_t m : {0, 1, 2, 3, 4, 5, 7, 10, 13}) {
        const int64_t n = kc.k << m;
        if (n > 8192 || (kc.k > 1 && m > 10)) continue;
        for (int layout = 0; layout < 2; ++layout) {
          // full row, or three blocks per row (block-diagonal)
          const int64_t cols = layout == 0 ? n : 3 * n;
          const int64_t rows = n >= 4096 ? 3 : 7;
          for (int variant = 0; variant < 4; ++variant) {
            tf::FwhtSpec s;
            s.n = n;
            s.k = kc.k;
            s.hadk = kc.h;
            s.transpose = variant & 1;
            s.normalize = variant != 2;
            if (variant >= 2) {
              s.signs = reinterpret_cast<const int8_t*>(1);  // run_case fills the real vector
              s.signs_first = variant == 3;
            }
            run_case(dtypes[di], rows, cols, s, seed++,
                     std::string(dnames[di]) + " n=" + std::to_string(n) + " k=" + std::to_string(kc.k) +
                         " cols=" + std::to_string(cols) + " variant=" + std::to_string(variant));
          }
        }
      }

  // K selection rules (§1.3): the file's largest divisor vs SpinQuant's first match.
  const int64_t file_keys[] = {1, 2, 4, 8, 12, 16, 20, 28, 32, 40, 64, 140, 172, 192, 224};
  const int64_t spin[] = {172, 156, 140, 108, 60, 52, 40, 36, 28, 20, 12};
  check(tf::hadamard_k_largest(14336, file_keys, 15) == 224, "largest 14336 -> 224");
  check(tf::hadamard_k_first(14336, spin, 11) == 28, "first 14336 -> 28");
  check(tf::hadamard_k_first(12288, spin, 11) == 12, "first 12288 -> 12");
  check(tf::hadamard_k_first(4096, spin, 11) == 1, "first pow2 -> 1");
  check(tf::hadamard_k_first(18944, spin, 11) == 0, "first 18944 -> none");
  check(tf::hadamard_k_largest(32, file_keys, 15) == 32, "largest 32 -> 32");

  tf::FwhtSpec bad;
  bad.n = 24;
  expect_throw("n does not divide cols", fr::DType::F64, 2, 32, bad);
  bad.n = 12;
  expect_throw("n not K*2^m without K", fr::DType::F64, 2, 12, bad);
  bad.k = 12;
  expect_throw("K matrix missing", fr::DType::F64, 2, 12, bad);
  std::vector<int8_t> zero(144, 0);
  bad.hadk = zero.data();
  expect_throw("K matrix not ±1", fr::DType::F64, 2, 12, bad);
  tf::FwhtSpec ok;
  ok.n = 4;
  expect_throw("integer dtype", fr::DType::I32, 2, 4, ok);

  return fastround::test::report();
}
