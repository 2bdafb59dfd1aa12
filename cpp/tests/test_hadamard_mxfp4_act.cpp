// The fused Hadamard + MXFP4 activation qdq kernel (fastround/transform/hadamard_mxfp4_act): for F32, BF16 and F16
// rows, rotation blocks 8, 16, 32, 64 and 96 (K = 3), with and without signs / transpose / normalization, the OpenMP
// fast path equals the scalar reference bit for bit at 1 and 4 threads, and the reference equals the unfused
// composition (fwht_rows_ref on an fp32 copy, times c rounded to the dtype, then a qdq written here from libm's
// log2 / exp2 and a nearest-level search with ties down). Edge cases: zero groups give -0, threshold ties go
// down, power-of-two maxima, subnormal maxima; bad options throw. Ends with "N passed, N failed".
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
#include "fastround/transform/hadamard_mxfp4_act.h"
#include "test_harness.h"

namespace fr = fastround;
namespace tf = fastround::transform;

using fastround::test::check;

namespace {

size_t elem_size(fr::DType dt) { return dt == fr::DType::F32 ? 4 : 2; }

// Values as `dt` holds them: per 32-group a random magnitude 2^[-20, 20], a few exact zeros and repeats.
std::vector<uint8_t> random_input(fr::DType dt, int64_t count, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ed(-20, 20), pick(0, 15);
  std::vector<float> v(static_cast<size_t>(count));
  float mag = 1.0f;
  for (int64_t i = 0; i < count; ++i) {
    if (i % 32 == 0) mag = std::ldexp(1.0f, ed(gen));
    const int p = pick(gen);
    v[i] = p == 0 ? 0.0f : p == 1 && i > 0 ? v[i - 1] : nd(gen) * mag;
  }
  std::vector<uint8_t> out(static_cast<size_t>(count) * elem_size(dt));
  fr::store_from_float(dt, v.data(), count, out.data(), 0);
  return out;
}

// The unfused composition, written independently of the kernel's scalar helpers.
float libm_scale(float amax) { return amax == 0.0f ? 0.0f : std::exp2(std::floor(std::log2(amax)) - 2.0f) / 0.75f; }

float nearest_level(float a) {  // ties go to the lower level: the thresholds are strict
  static const float levels[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float best = 0.0f;
  for (float l : levels)
    if (std::fabs(a - l) < std::fabs(a - best)) best = l;
  return best;
}

std::vector<uint8_t> unfused(fr::DType dt, const std::vector<uint8_t>& x, int64_t rows, int64_t cols,
                             const tf::FwhtSpec& rot) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  fr::load_as_float(dt, x.data(), 0, rows * cols, v.data());
  tf::FwhtSpec sums = rot;
  sums.normalize = false;
  tf::fwht_rows_ref(fr::DType::F32, v.data(), rows, cols, sums);
  const float c = tf::hadamard_norm_in(dt, rot.n);
  for (int64_t g = 0; g < rows * cols; g += 32) {
    if (rot.normalize)
      for (int64_t i = 0; i < 32; ++i) v[g + i] = v[g + i] * c;
    float amax = 0.0f;
    for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[g + i]));
    const float s = libm_scale(amax);
    for (int64_t i = 0; i < 32; ++i) {
      const float r = v[g + i] / s;
      v[g + i] = (r > 0.0f ? nearest_level(std::fabs(r)) : -nearest_level(std::fabs(r))) * s;
    }
  }
  std::vector<uint8_t> out(x.size());
  fr::store_from_float(dt, v.data(), rows * cols, out.data(), 0);
  return out;
}

std::string dname(fr::DType dt) { return std::string(fr::dtype_name(dt)); }

void compare_case(fr::DType dt, int64_t rows, int64_t cols, const tf::FwhtSpec& rot, const std::string& tag) {
  const auto x = random_input(dt, rows * cols, static_cast<uint32_t>(rows * 131 + cols * 7 + rot.n));
  std::vector<uint8_t> ref(x.size()), fast(x.size());
  tf::hadamard_mxfp4_act_rows_ref(dt, x.data(), ref.data(), rows, cols, rot);
  check(ref == unfused(dt, x, rows, cols, rot), tag + " " + dname(dt) + ": reference == FWHT then libm qdq");
  for (int threads : {1, 4}) {
    fr::set_num_threads(threads);
    tf::hadamard_mxfp4_act_rows(dt, x.data(), fast.data(), rows, cols, rot);
    check(fast == ref, tag + " " + dname(dt) + " threads " + std::to_string(threads) + ": fast == reference");
  }
  std::vector<uint8_t> inplace = x;  // out may be x
  tf::hadamard_mxfp4_act_rows(dt, inplace.data(), inplace.data(), rows, cols, rot);
  check(inplace == ref, tag + " " + dname(dt) + ": in place");
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

void expect_throw(const std::string& name, fr::DType dt, int64_t rows, int64_t cols, const tf::FwhtSpec& s) {
  std::vector<uint8_t> buf(static_cast<size_t>(rows * cols) * 8 + 8);
  bool threw = false;
  try {
    tf::hadamard_mxfp4_act_rows(dt, buf.data(), buf.data(), rows, cols, s);
  } catch (const fr::OptionError&) {
    threw = true;
  }
  check(threw, "throws: " + name);
}

}  // namespace

int main() {
  std::vector<int8_t> signs64(64), hadk3 = {1, 1, 1, 1, -1, 1, 1, 1, -1};  // any ±1 K matrix will do
  std::mt19937 gen(7);
  for (auto& s : signs64) s = gen() & 1 ? 1 : -1;
  for (fr::DType dt : {fr::DType::F32, fr::DType::BF16, fr::DType::F16}) {
    tf::FwhtSpec h32;
    h32.n = 32;
    compare_case(dt, 37, 256, h32, "hadamard n=32");
    compare_case(dt, 1, 32, h32, "hadamard n=32 one group");
    tf::FwhtSpec r32 = h32;  // random_hadamard as rotation.py calls it: x·M^T = diag(d)·T^T·x
    r32.transpose = true;
    r32.signs = signs64.data();
    compare_case(dt, 9, 96, r32, "random n=32");
    tf::FwhtSpec raw = h32;
    raw.normalize = false;
    compare_case(dt, 5, 64, raw, "unnormalized n=32");
    for (int64_t n : {8, 16, 64}) {
      tf::FwhtSpec s;
      s.n = n;
      s.signs = signs64.data();
      s.signs_first = true;
      compare_case(dt, 6, 128, s, "n=" + std::to_string(n));
    }
    tf::FwhtSpec k3;
    k3.n = 96;
    k3.k = 3;
    k3.hadk = hadk3.data();
    compare_case(dt, 4, 192, k3, "n=96 K=3");
  }
  fr::set_num_threads(4);

  // c rounded to the dtype: bf16 and fp16 both give 181/1024 for n = 32 (upstream's cast block matrix)
  check(tf::hadamard_norm_in(fr::DType::BF16, 32) == 181.0f / 1024.0f, "bf16(1/sqrt(32)) == 181/1024");
  check(tf::hadamard_norm_in(fr::DType::F16, 32) == 181.0f / 1024.0f, "fp16(1/sqrt(32)) == 181/1024");
  check(tf::hadamard_norm_in(fr::DType::F32, 32) == static_cast<float>(1.0 / std::sqrt(32.0)), "fp32 c");

  // The scale: powers of two at the boundaries, subnormal maxima, the special values.
  check(tf::mxfp4_act_scale(6.0f) == 1.0f / 0.75f, "scale(6) = 1/0.75");
  check(tf::mxfp4_act_scale(4.0f) == 1.0f / 0.75f, "scale(4) = 1/0.75 (floor(log2 4) = 2)");
  check(tf::mxfp4_act_scale(std::nextafter(4.0f, 0.0f)) == 0.5f / 0.75f, "scale just below 4");
  for (int e = -149; e <= 127; ++e) {
    const float a = std::ldexp(1.0f, e);
    if (tf::mxfp4_act_scale(a) != std::ldexp(1.0f, e - 2) / 0.75f ||
        tf::mxfp4_act_scale(std::nextafter(a, INFINITY)) != std::ldexp(1.0f, e - 2) / 0.75f) {
      check(false, "scale(2^" + std::to_string(e) + ") == ldexp(1, e - 2) / 0.75");
      break;
    }
  }
  check(tf::mxfp4_act_scale(0.0f) == 0.0f, "scale(0) = 0");
  check(std::isinf(tf::mxfp4_act_scale(INFINITY)), "scale(inf) = inf");

  // Ties go down, strictly greater goes up; zeros and small negatives are -0, small positives +0.
  const float s1 = 1.0f;  // r = v
  check(tf::mxfp4_act_qdq(5.0f, s1) == 4.0f && tf::mxfp4_act_qdq(std::nextafter(5.0f, 9.0f), s1) == 6.0f, "tie at 5");
  check(tf::mxfp4_act_qdq(0.25f, s1) == 0.0f && tf::mxfp4_act_qdq(-0.75f, s1) == -0.5f, "ties at .25 and -.75");
  check(tf::mxfp4_act_qdq(2.5f, s1) == 2.0f && tf::mxfp4_act_qdq(-3.5f, s1) == -3.0f, "ties at 2.5 and -3.5");
  check(bits(tf::mxfp4_act_qdq(0.0f, s1)) == 0x80000000u, "0 -> -0");
  check(bits(tf::mxfp4_act_qdq(-0.1f, s1)) == 0x80000000u && bits(tf::mxfp4_act_qdq(0.1f, s1)) == 0u, "small ±");
  {
    std::vector<float> zeros(64, 0.0f), out(64, 1.0f);
    tf::FwhtSpec h;
    h.n = 32;
    tf::hadamard_mxfp4_act_rows(fr::DType::F32, zeros.data(), out.data(), 1, 64, h);
    bool all_neg_zero = true;
    for (float v : out) all_neg_zero = all_neg_zero && bits(v) == 0x80000000u;
    check(all_neg_zero, "an all-zero row gives -0 everywhere (0/0 passes no threshold)");
  }

  {
    // n = 1 without normalization is the identity: the kernel is then the bare qdq, fed exact threshold ties
    // (t·s for every threshold t, and their neighbours) in groups whose scale is 4/3 (amax 4.5).
    tf::FwhtSpec id;
    id.n = 1;
    id.normalize = false;
    const float s = tf::mxfp4_act_scale(4.5f);
    std::vector<float> x;
    int reachable = 0;
    for (float t : {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f}) {
      float v = t * s;  // the float whose quotient by s is exactly t (a neighbour of t·s when t·s rounds)
      for (float c : {std::nextafter(v, 0.0f), std::nextafter(v, INFINITY)})
        if (v / s != t && c / s == t) v = c;
      if (v / s == t) ++reachable;  // 1.75 and 3.5 are not quotients of any float by s: those ties cannot occur
      for (float e : {std::nextafter(v, 0.0f), v, std::nextafter(v, INFINITY)}) {
        x.push_back(e);
        x.push_back(-e);
      }
    }
    check(reachable >= 5, "at least 5 of the 7 threshold ties are exact inputs");
    while (x.size() % 32) x.push_back(0.0f);
    for (size_t g = 0; g < x.size(); g += 32) x[g + 31] = 4.5f;
    const int64_t cols = static_cast<int64_t>(x.size());
    std::vector<uint8_t> xb(x.size() * 4);
    std::memcpy(xb.data(), x.data(), xb.size());
    std::vector<uint8_t> ref(xb.size()), fast(xb.size());
    tf::hadamard_mxfp4_act_rows_ref(fr::DType::F32, xb.data(), ref.data(), 1, cols, id);
    tf::hadamard_mxfp4_act_rows(fr::DType::F32, xb.data(), fast.data(), 1, cols, id);
    check(ref == unfused(fr::DType::F32, xb, 1, cols, id), "threshold ties: reference == libm qdq");
    check(fast == ref, "threshold ties: fast == reference");
    float first[3];
    std::memcpy(first, ref.data(), 4);
    std::memcpy(first + 1, ref.data() + 8, 4);
    std::memcpy(first + 2, ref.data() + 16, 4);
    check(first[0] == 0.0f && first[1] == 0.0f && first[2] == 0.5f * s, "0.25 tie: below and at go to 0, above 0.5");
  }

  tf::FwhtSpec ok;
  ok.n = 32;
  expect_throw("cols not a multiple of 32", fr::DType::F32, 2, 48, [] { tf::FwhtSpec s; s.n = 16; return s; }());
  expect_throw("F64 input", fr::DType::F64, 2, 32, ok);
  expect_throw("block does not divide cols", fr::DType::F32, 2, 32, [] { tf::FwhtSpec s; s.n = 64; return s; }());
  {
    std::vector<float> x(32, 1.0f);
    bool threw = false;
    try {
      tf::hadamard_mxfp4_act_rows(fr::DType::F32, x.data(), nullptr, 1, 32, ok);
    } catch (const fr::OptionError&) {
      threw = true;
    }
    check(threw, "throws: null out");
  }
  return fastround::test::report();
}
