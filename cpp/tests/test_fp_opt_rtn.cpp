// The regular flow's imatrix-weighted MXFP search (fastround/quant/fp_opt_rtn.h): for MXFP4 and MXFP8, every source
// dtype, imatrix shape (the zero rules of _imatrix_handle_zero included) and thread count, the row-parallel kernel
// equals the whole-tensor reference bit for bit, and the encoding table's encode / encode_ref route an imatrix
// there. Two properties tie the weights to the search: an imatrix of ones gives model-free's unweighted codes, and
// a skewed one moves some exponents. Plain C++; tests/test_mx_opt_rtn.py runs it. Ends with "N passed, N failed".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/parallel.h"
#include "fastround/pack/pack_fp.h"
#include "fastround/quant/encoding.h"
#include "fastround/quant/fp_opt_rtn.h"
#include "fastround/quant/fp_rtn.h"
#include "test_harness.h"

namespace fr = fastround;

using fastround::test::check;

namespace {

constexpr int64_t kRows = 24, kCols = 256;  // 8 groups a row

// Log-uniform magnitudes with random signs; rows 0..4 are planted: all zero, one all-zero group, values whose
// squares underflow (sigma 0 in the row fallback, exact zeros beside them), grid ties, and for MXFP8 a first
// column in the clamp band (500 saturates to 448 at its exponent) beside subnormal-coded values (3 * 2^-9, which
// the next exponent rounds): unweighted, the next exponent wins; with a light first column, its own.
std::vector<uint8_t> make_weight(uint32_t seed, fr::DType dt) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> expo(-9.0f, 3.0f), unit(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(kRows * kCols));
  for (auto& v : w) v = (unit(gen) < 0.5f ? -1.0f : 1.0f) * std::exp2(expo(gen));
  std::fill_n(w.begin(), kCols, 0.0f);
  std::fill_n(w.begin() + kCols, 32, 0.0f);
  for (int64_t c = 0; c < kCols; ++c) w[2 * kCols + c] = c % 3 == 0 ? 0.0f : 1e-25f * static_cast<float>(c % 7 + 1);
  for (int64_t c = 0; c < kCols; ++c) w[3 * kCols + c] = 0.25f * static_cast<float>(c % 13) - 1.5f;
  for (int64_t c = 0; c < kCols; ++c) w[4 * kCols + c] = c % 32 == 0 ? 500.0f : 3.0f / 512.0f;
  std::vector<uint8_t> out(w.size() * static_cast<size_t>(fr::dtype_bits(dt) / 8));  // in the source dtype
  fr::store_from_float(dt, w.data(), static_cast<int64_t>(w.size()), out.data(), 0);
  return out;
}

enum Kind { Positive, Ones, Skewed, LightFirst, Scattered, Mixed, AllZero, ZeroGroupFill, NegativeMin, kKinds };
const char* kind_name(int k) {
  static const char* names[] = {"positive", "ones",     "skewed",          "light_first", "scattered",
                                "mixed",    "all_zero", "zero_group_fill", "negative_min"};
  return names[k];
}

std::vector<float> make_imatrix(int kind, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(0.01f, 4.0f), e(-12.0f, 12.0f);
  std::vector<float> m(static_cast<size_t>(kCols));
  for (auto& v : m) v = kind == Ones ? 1.0f : kind == Skewed ? std::exp2(e(gen)) : u(gen);
  auto zero = [&](int64_t group, int count) { std::fill_n(m.begin() + group * 32, count, 0.0f); };
  switch (kind) {
    case Scattered:  // 1..3 zeros a group: the mean fill
      for (int64_t c = 0; c < kCols; c += 11) m[static_cast<size_t>(c)] = 0.0f;
      break;
    case Mixed:  // from the weight row (32, 17 zeros; 20 tiny nonzero), the mean at the 16-zero boundary, -0.0
      zero(0, 32);
      zero(1, 16);
      zero(2, 17);
      std::fill_n(m.begin() + 3 * 32, 20, 1e-31f);
      m[4 * 32 + 5] = -0.0f;
      break;
    case AllZero:
      std::fill(m.begin(), m.end(), 0.0f);
      break;
    case ZeroGroupFill:  // an all-zero group beside a mean-filled one: zero weight groups get 0/0 = NaN weights
      zero(0, 32);
      zero(5, 2);
      break;
    case NegativeMin:  // zeros, but the min is not 0: left as is
      zero(0, 32);
      m[40] = -0.5f;
      break;
    case LightFirst:  // each group's first column weighs 1e-6, the rest 1e4
      for (int64_t c = 0; c < kCols; ++c) m[static_cast<size_t>(c)] = c % 32 == 0 ? 1e-6f : 1e4f;
      break;
    default:
      break;
  }
  return m;
}

struct Codes {
  std::vector<uint8_t> codes = std::vector<uint8_t>(kRows * kCols), scales = std::vector<uint8_t>(kRows * kCols / 32);
  bool operator==(const Codes& o) const { return codes == o.codes && scales == o.scales; }
};

// Model-free's unweighted search, unpacked.
Codes model_free(fr::DType dt, const void* w, const fr::MxfpLayout& L) {
  Codes c;
  std::vector<uint8_t> packed(static_cast<size_t>(L.weight_bytes()));
  fr::quantize_mxfp_ref(dt, w, L, true, packed.data(), c.scales.data());
  if (L.bits == 4)
    fr::unpack_e2m1_ref(packed.data(), kRows * kCols, c.codes.data());
  else
    c.codes = packed;
  return c;
}

void walk(int max_threads, int64_t moved[2]) {
  uint32_t seed = 1;
  for (int bits : {4, 8})
    for (fr::DType dt : {fr::DType::F32, fr::DType::F16, fr::DType::BF16})
      for (int kind = 0; kind < kKinds; ++kind) {
        const std::vector<uint8_t> wb = make_weight(seed, dt);
        const std::vector<float> im = make_imatrix(kind, seed++);
        const fr::MxfpLayout L = fr::mxfp_layout(kRows, kCols, bits);
        const std::string at = std::string("mxfp") + std::to_string(bits) + " " + std::string(fr::dtype_name(dt)) +
                               " imatrix=" + kind_name(kind);
        Codes ref;
        fr::mx_opt_rtn_ref(dt, wb.data(), L, im.data(), ref.codes.data(), ref.scales.data());
        const fr::EncodingTraits& row = fr::encoding(bits == 4 ? fr::Encoding::Mxfp4 : fr::Encoding::Mxfp8);
        fr::EncodingParams p;
        p.bits = bits;
        p.group_size = 32;
        p.opt_rtn = true;
        p.imatrix = im.data();
        const fr::WeightView wv{dt, wb.data(), kRows, kCols};
        for (int threads : {1, max_threads}) {
          fr::set_num_threads(threads);
          const std::string here = at + " threads=" + std::to_string(threads);
          Codes fast;
          fr::mx_opt_rtn(dt, wb.data(), L, im.data(), fast.codes.data(), fast.scales.data());
          check(fast == ref, "mx_opt_rtn != mx_opt_rtn_ref: " + here);
          fr::CodesBuffers enc;
          row.encode(wv, p, enc);
          check(enc.codes == ref.codes && enc.scales == ref.scales && enc.scale_dtype == fr::DType::U8,
                "table encode != mx_opt_rtn_ref: " + here);
        }
        fr::CodesBuffers enc_ref;
        row.encode_ref(wv, p, enc_ref);
        check(enc_ref.codes == ref.codes && enc_ref.scales == ref.scales, "table encode_ref != mx_opt_rtn_ref: " + at);
        const Codes mf = model_free(dt, wb.data(), L);
        Codes unweighted;
        fr::mx_opt_rtn(dt, wb.data(), L, nullptr, unweighted.codes.data(), unweighted.scales.data());
        check(unweighted == mf, "mx_opt_rtn without imatrix != model-free's search: " + at);
        if (kind == Ones) check(ref == mf, "imatrix of ones != model-free's search: " + at);
        if (kind == Skewed || kind == LightFirst)
          for (size_t i = 0; i < ref.scales.size(); ++i) moved[bits == 8] += ref.scales[i] != mf.scales[i];
      }
}

void bad_input() {
  const std::vector<uint8_t> wb = make_weight(99, fr::DType::F32);
  std::vector<float> im(static_cast<size_t>(kCols), 1.0f);
  im[7] = std::nanf("");
  Codes out;
  for (bool ref : {false, true}) {
    bool threw = false;
    try {
      (ref ? fr::mx_opt_rtn_ref : fr::mx_opt_rtn)(fr::DType::F32, wb.data(), fr::MxfpLayout{kRows, kCols, 4}, im.data(),
                                                  out.codes.data(), out.scales.data());
    } catch (const fr::OptionError& e) {
      threw = std::string(e.what()).find("imatrix: entry 7 is not finite") != std::string::npos;
    }
    check(threw, std::string("a NaN imatrix entry is refused by name: ") + (ref ? "reference" : "fast"));
  }
}

}  // namespace

int main() {
  int64_t moved[2] = {0, 0};
  walk(std::max(2, fr::max_threads()), moved);
  // A skewed imatrix must change some exponents against the unweighted search, or the weights are not used.
  check(moved[0] > 0, "a skewed imatrix moves no MXFP4 exponent");
  check(moved[1] > 0, "a skewed imatrix moves no MXFP8 exponent");
  std::printf("skewed imatrices: %lld MXFP4 and %lld MXFP8 exponents differ from the unweighted search\n",
              static_cast<long long>(moved[0]), static_cast<long long>(moved[1]));
  bad_input();
  return fastround::test::report();
}
