// Walks the encoding table: for every row, source dtype, parameter set and thread count, the fast kernels
// equal their scalar references bit for bit, packing the reference codes gives the quantizer's bytes, and
// the reference dequantizer reads them back close to the weight. Plain C++ (no Python, no torch);
// tests/test_cpp_core.py runs it in CI. Prints one line per failure and ends with "N passed, N failed".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/parallel.h"
#include "fastround/pack/pack_awq.h"
#include "fastround/quant/encoding.h"

namespace fr = fastround;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Deterministic weights: a spread of magnitudes, with edge rows planted at the top (all zero, one tiny
// value, ties for the rounding, one outlier).
std::vector<float> make_weight(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> w(static_cast<size_t>(rows * cols));
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& v : w) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const double u = static_cast<double>(s >> 11) / 9007199254740992.0;  // [0, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const double m = static_cast<double>(s >> 11) / 9007199254740992.0;
    v = static_cast<float>((u - 0.5) * std::exp2(6.0 * m - 5.0));
  }
  if (rows > 3) {
    std::fill_n(w.begin(), cols, 0.0f);
    w[static_cast<size_t>(cols)] = 1e-7f;
    for (int64_t c = 0; c < cols; ++c) w[static_cast<size_t>(2 * cols + c)] = 0.25f * static_cast<float>(c % 9 - 4);
    w[static_cast<size_t>(3 * cols + 1)] = 40.0f;
  }
  return w;
}

std::vector<uint8_t> as_dtype(const std::vector<float>& w, fr::DType dt) {
  std::vector<uint8_t> out(w.size() * static_cast<size_t>(fr::dtype_bits(dt) / 8));
  fr::store_from_float(dt, w.data(), static_cast<int64_t>(w.size()), out.data(), 0);
  return out;
}

struct Outputs {
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<void*> ptrs;
  explicit Outputs(const std::vector<fr::TensorSpec>& specs) {
    for (const auto& s : specs) bufs.emplace_back(static_cast<size_t>(s.nbytes()), uint8_t{0xA5});
    for (auto& b : bufs) ptrs.push_back(b.data());
  }
  bool operator==(const Outputs& o) const { return bufs == o.bufs; }
};

struct Case {
  int64_t rows, cols;
  fr::EncodingParams p;
};

std::vector<Case> cases_for(const fr::EncodingTraits& e) {
  std::vector<Case> out;
  auto add = [&](int64_t rows, int64_t cols, int bits, int64_t group, bool sym, bool opt) {
    if (!e.supports_bits(bits)) return;
    fr::EncodingParams p;
    p.bits = bits;
    p.group_size = e.fixed_group ? e.fixed_group : group;
    p.sym = sym;
    p.opt_rtn = opt;
    out.push_back({rows, cols, p});
  };
  for (int bits : {2, 4, 8})
    for (bool sym : {true, false})
      for (bool opt : {true, false}) {
        if (e.fixed_group && !sym) continue;  // FP encodings have no zero point
        if (!e.fixed_group && !opt) continue;  // INT RTN has no search
        add(64, 256, bits, 128, sym, opt);
        add(40, 96, bits, 32, sym, opt);
        add(72, 128, bits, -1, sym, opt);
        if (e.pads_partial_groups) add(33, 200, bits, 64, sym, opt);  // in and out both padded
      }
  return out;
}

std::string label(const fr::EncodingTraits& e, const Case& c, fr::DType dt, int threads) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s [%lld, %lld] bits=%d group=%lld sym=%d opt=%d threads=%d",
                std::string(e.name).c_str(), std::string(fr::dtype_name(dt)).c_str(), static_cast<long long>(c.rows),
                static_cast<long long>(c.cols), c.p.bits, static_cast<long long>(c.p.group_size), c.p.sym, c.p.opt_rtn,
                threads);
  return buf;
}

void walk_row(const fr::EncodingTraits& e, int max_threads) {
  uint64_t seed = 1;
  for (const Case& c : cases_for(e))
    for (fr::DType dt : {fr::DType::F32, fr::DType::F16, fr::DType::BF16}) {
      const std::vector<float> wf = make_weight(c.rows, c.cols, seed++);
      const std::vector<uint8_t> wb = as_dtype(wf, dt);
      const fr::WeightView w{dt, wb.data(), c.rows, c.cols};
      const auto specs = e.layout(c.rows, c.cols, c.p, dt);
      Outputs ref(specs);
      e.quantize_ref(w, c.p, ref.ptrs.data());
      fr::CodesBuffers codes;
      e.encode_ref(w, c.p, codes);
      for (int threads : {1, max_threads}) {
        fr::set_num_threads(threads);
        const std::string at = label(e, c, dt, threads);
        Outputs fast(specs), packed(specs), packed_ref(specs);
        e.quantize(w, c.p, fast.ptrs.data());
        check(fast == ref, "quantize != quantize_ref: " + at);
        e.pack(codes.view(c.rows, c.cols), c.p, packed.ptrs.data());
        e.pack_ref(codes.view(c.rows, c.cols), c.p, packed_ref.ptrs.data());
        check(packed == packed_ref, "pack != pack_ref: " + at);
        check(packed_ref == ref, "pack_ref(encode_ref) != quantize_ref: " + at);
        if (e.fake_quantize) {
          std::vector<uint8_t> fake(wb.size());
          e.fake_quantize(w, c.p, fake.data());
          std::vector<float> deq(wf.size());
          std::vector<const void*> ins(ref.ptrs.begin(), ref.ptrs.end());
          e.dequantize_ref(ins.data(), c.rows, c.cols, c.p, deq.data());
          check(as_dtype(deq, dt) == fake, "fake_quantize != dequantize_ref(quantize_ref): " + at);
        }
      }
      // The dequantizer reads the packed bytes back close to the weight (relative Frobenius error).
      std::vector<float> deq(wf.size());
      std::vector<const void*> ins(ref.ptrs.begin(), ref.ptrs.end());
      e.dequantize_ref(ins.data(), c.rows, c.cols, c.p, deq.data());
      std::vector<float> src(wf.size());
      fr::load_as_float(dt, wb.data(), 0, static_cast<int64_t>(wf.size()), src.data());
      double num = 0, den = 0;
      for (size_t i = 0; i < src.size(); ++i) {
        num += (static_cast<double>(deq[i]) - src[i]) * (static_cast<double>(deq[i]) - src[i]);
        den += static_cast<double>(src[i]) * src[i];
      }
      const double bound = c.p.bits == 2 ? 0.75 : c.p.bits == 4 ? 0.3 : 0.08;
      const double rel = std::sqrt(num / den);
      char what[64];
      std::snprintf(what, sizeof what, " (relative error %.3g > %.3g)", rel, bound);
      check(std::isfinite(rel) && rel < bound, "dequantize_ref too far from the weight: " + label(e, c, dt, 0) + what);
    }
}

// The worked examples of shared/reference/signround.md §6.2 and §6.3: codes [0, 11, 7, 14, 3, 15, 8, 1] along
// in_features pack to GPTQ word 0x18F3E7B0; along out_features, to AWQ word 0x1FEB8370.
void worked_examples() {
  const uint8_t codes[8] = {0, 11, 7, 14, 3, 15, 8, 1};
  const uint16_t scales[8] = {0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00, 0x3C00};
  const int32_t zeros[8] = {8, 8, 8, 8, 8, 8, 8, 8};
  fr::IntCodesView gptq;  // one output channel, 8 inputs, one group
  gptq.rows = 1;
  gptq.cols = 8;
  gptq.group = 8;
  gptq.codes = codes;
  gptq.scales = scales;
  gptq.zeros = zeros;
  gptq.pad_zero = 8;
  int32_t qw[1], qz[1];
  uint16_t sc[1];
  fr::pack_gptq(gptq, 1, qw, qz, sc);
  check(static_cast<uint32_t>(qw[0]) == 0x18F3E7B0u, "GPTQ worked example");
  check(static_cast<uint32_t>(qz[0]) == 0x77777777u, "GPTQ sym zero point 8 stored as 7");
  fr::IntCodesView awq = gptq;  // eight output channels, one input each
  awq.rows = 8;
  awq.cols = 1;
  awq.group = 1;
  uint16_t sc8[8];
  fr::pack_awq(awq, qw, qz, sc8);
  check(static_cast<uint32_t>(qw[0]) == 0x1FEB8370u, "AWQ worked example");
  check(static_cast<uint32_t>(qz[0]) == 0x88888888u, "AWQ stores zero points as they are");
}

}  // namespace

int main() {
  worked_examples();
  const int max_threads = std::max(2, fr::max_threads());
  for (const fr::EncodingTraits& e : fr::encodings()) {
    const int before = passed + failed;
    walk_row(e, max_threads);
    std::printf("%-12s %d checks\n", std::string(e.name).c_str(), passed + failed - before);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
