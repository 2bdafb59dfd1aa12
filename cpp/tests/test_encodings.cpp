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
#include "fastround/quant/codes.h"
#include "fastround/quant/encoding.h"
#include "fastround/quant/int_opt_rtn.h"

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
        if (!e.fixed_group) add(8, 2104, bits, -1, sym, opt);  // one long group: torch's cascaded sum order
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

// The regular flow's producer and dequantizer (`encode`, `dequantize_codes`): INT RTN and OPT-RTN fast == their
// scalar references for every dtype, thread count and imatrix shape; on F32 weights INT RTN gives model-free's
// codes; FP rows give encode_ref's codes; dequantize_codes of fp16-scaled codes == dequantize_ref of their packing.
std::vector<float> make_imatrix(int64_t cols, int kind, int64_t group, uint64_t seed) {
  std::vector<float> m(static_cast<size_t>(cols));
  uint64_t s = seed * 2862933555777941757ull + 3037000493ull;
  for (auto& v : m) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<float>(static_cast<double>(s >> 11) / 9007199254740992.0) * 4.0f;
  }
  if (kind >= 2)  // scattered exact zeros (a few per group: the mean fill)
    for (int64_t c = 0; c < cols; c += 7) m[static_cast<size_t>(c)] = 0.0f;
  if (kind >= 3)  // one whole group of zeros (weights from the weight row)
    std::fill_n(m.begin(), std::min(cols, group > 0 ? group : cols), 0.0f);
  return m;
}

void walk_regular(const fr::EncodingTraits& e, int max_threads) {
  uint64_t seed = 1000;
  for (const Case& c0 : cases_for(e))
    for (fr::DType dt : {fr::DType::F32, fr::DType::F16, fr::DType::BF16}) {
      const std::vector<float> wf = make_weight(c0.rows, c0.cols, seed++);
      const std::vector<uint8_t> wb = as_dtype(wf, dt);
      const fr::WeightView w{dt, wb.data(), c0.rows, c0.cols};
      const bool is_int = e.fixed_group == 0;
      // INT: RTN, and for sym OPT-RTN without an imatrix and with imatrices of three shapes.
      std::vector<std::pair<bool, int>> variants = {{false, 0}};
      if (is_int && c0.p.sym)
        for (int kind : {0, 1, 2, 3}) variants.push_back({true, kind});
      if (!is_int) variants = {{c0.p.opt_rtn, 0}};
      for (const auto& [opt, kind] : variants) {
        Case c = c0;
        c.p.opt_rtn = opt;
        const std::vector<float> imatrix = make_imatrix(c.cols, kind, c.p.group_size, seed);
        c.p.imatrix = (is_int && opt && kind > 0) ? imatrix.data() : nullptr;
        const fr::IntGrouping g = fr::int_grouping(c.rows, c.cols, c.p.group_size, "weight");
        fr::CodesBuffers ref;
        std::string at = label(e, c, dt, 0) + " imatrix=" + std::to_string(kind);
        if (is_int) {
          ref.codes.resize(static_cast<size_t>(c.rows * c.cols));
          ref.zeros.assign(static_cast<size_t>(g.rows * g.groups), 1 << (c.p.bits - 1));
          if (opt) {
            ref.scale_dtype = dt;
            ref.scales.resize(static_cast<size_t>(g.rows * g.groups * fr::dtype_bits(dt) / 8));
            fr::int_opt_rtn_ref(dt, wb.data(), g, c.p.bits, c.p.imatrix, ref.codes.data(), ref.scales.data());
          } else {
            ref.scales.resize(static_cast<size_t>(g.rows * g.groups * 2));
            fr::int_rtn_codes_ref(dt, wb.data(), g, c.p.bits, c.p.sym, ref.codes.data(),
                                  reinterpret_cast<uint16_t*>(ref.scales.data()), ref.zeros.data());
          }
        } else {
          e.encode_ref(w, c.p, ref);
        }
        for (int threads : {1, max_threads}) {
          fr::set_num_threads(threads);
          const std::string here = at + " threads=" + std::to_string(threads);
          fr::CodesBuffers fast;
          e.encode(w, c.p, fast);
          check(fast.codes == ref.codes && fast.scales == ref.scales && fast.zeros == ref.zeros &&
                    fast.scale_dtype == ref.scale_dtype,
                "encode != reference: " + here);
        }
        if (is_int && !opt && dt == fr::DType::F32) {  // model-free casts to fp32: same codes as its encode_ref
          fr::CodesBuffers mf;
          e.encode_ref(w, c.p, mf);
          check(mf.codes == ref.codes && mf.scales == ref.scales && mf.zeros == ref.zeros,
                "F32 RTN encode != model-free encode_ref: " + at);
        }
        if (!(is_int && opt)) {  // fp16 / byte scales: the packed layout's dequantizer reads the same values
          const auto specs = e.layout(c.rows, c.cols, c.p, dt);
          Outputs packed(specs);
          e.pack_ref(ref.view(c.rows, c.cols), c.p, packed.ptrs.data());
          std::vector<float> deq(wf.size());
          std::vector<const void*> ins(packed.ptrs.begin(), packed.ptrs.end());
          e.dequantize_ref(ins.data(), c.rows, c.cols, c.p, deq.data());
          std::vector<uint8_t> out(wb.size());
          e.dequantize_codes(ref.view(c.rows, c.cols), c.p, nullptr, dt, out.data());
          check(as_dtype(deq, dt) == out, "dequantize_codes != dequantize_ref(pack_ref): " + at);
        } else {  // OPT-RTN: the qdq is dt(q * scale); it stays close to the weight
          std::vector<float> back(wf.size()), src(wf.size());
          e.dequantize_codes(ref.view(c.rows, c.cols), c.p, &w, fr::DType::F32, back.data());
          fr::load_as_float(dt, wb.data(), 0, static_cast<int64_t>(wf.size()), src.data());
          double num = 0, den = 0;
          for (size_t i = 0; i < src.size(); ++i) {
            num += (static_cast<double>(back[i]) - src[i]) * (static_cast<double>(back[i]) - src[i]);
            den += static_cast<double>(src[i]) * src[i];
          }
          const double bound = c.p.bits == 2 ? 0.75 : c.p.bits == 4 ? 0.3 : 0.08;
          check(std::sqrt(num / den) < bound, "OPT-RTN qdq too far from the weight: " + at);
        }
      }
    }
}

// torch's fp32 row sum: exact inputs whose every association gives the same result, plus the one order that
// keeps a cancellation: 2^24 + 1 + ... collapses unless lanes meet first.
void torch_sum_checks() {
  std::vector<float> x(37);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  check(fr::torch_sum_f32(x.data(), 37) == 666.0f, "torch_sum_f32 of 0..36");
  // lanes: element i joins lane i % 8; 16777216 + 1 + 1 summed in one lane loses both ones, across lanes it keeps them
  std::vector<float> y(16, 0.0f);
  y[0] = 16777216.0f;
  y[1] = 1.0f;
  y[9] = 1.0f;
  // lane 1 holds 1 + 1 = 2 before meeting lane 0's 2^24: the total is exact
  check(fr::torch_sum_f32(y.data(), 16) == 16777218.0f, "torch_sum_f32 lane order");
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
  torch_sum_checks();
  const int max_threads = std::max(2, fr::max_threads());
  for (const fr::EncodingTraits& e : fr::encodings()) {
    const int before = passed + failed;
    walk_row(e, max_threads);
    walk_regular(e, max_threads);
    std::printf("%-12s %d checks\n", std::string(e.name).c_str(), passed + failed - before);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
