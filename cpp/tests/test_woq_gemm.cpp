// The woq linear kernels (fastround/infer) on words written by fastround's own packers (pack_gptq with zero offset
// 1 and 0, pack_awq): the layout decoder reads back the packers' codes and zero points; every ISA's dequantizer
// equals the reference bit for bit (fp32 and bf16); every ISA's GEMV equals the fp32 reference to summation-order
// rounding, for bits 2/4/8, grouped / partial-group / per-channel layers, padded inputs, vector tails, several x
// dtypes, scale dtypes and row counts, and gives the same bits at 1, 2 and 3 threads. The same for GPTQ words in
// the tiled order (woq_tile_qweight), whose decoder must read back the packer's codes too. Plain C++;
// tests/test_woq_linear.py runs it. Ends with "N passed, N failed".
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/common/cpu.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"
#include "fastround/infer/woq_gemm.h"
#include "fastround/pack/pack_awq.h"
#include "fastround/pack/pack_gptq.h"
#include "test_harness.h"

namespace fr = fastround;
namespace fi = fastround::infer;

using fastround::test::check;

namespace {

// One packed layer plus the unpacked truth it came from.
struct Layer {
  fi::WoqWeightView view;
  std::vector<uint8_t> codes;     // [out, in]
  std::vector<int32_t> zeros;     // [out, groups] as the consumer must see them
  std::vector<float> scale_f;     // [out, groups]
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint8_t> scales;    // [groups, out] in scale_dtype
};

Layer make_layer(fi::WoqLayout layout, int bits, int64_t in, int64_t out, int64_t group_size, fr::DType sdt,
                 uint32_t seed, bool tiled) {
  std::mt19937 gen(seed);
  Layer l;
  const int pf = 32 / bits, maxq = (1 << bits) - 1;
  fr::IntCodesView c;
  c.rows = out;
  c.cols = in;
  c.bits = bits;
  c.group = group_size == -1 ? (in + pf - 1) / pf * pf : group_size;
  const int64_t groups = c.groups();
  l.codes.resize(static_cast<size_t>(out * in));
  l.zeros.resize(static_cast<size_t>(out * groups));
  l.scale_f.resize(static_cast<size_t>(out * groups));
  std::vector<uint16_t> s16(l.zeros.size());
  std::uniform_int_distribution<int> code(0, maxq), zp(layout == fi::WoqLayout::Gptq ? 1 : 0, maxq);
  std::uniform_real_distribution<float> sd(0.002f, 0.05f);
  for (auto& q : l.codes) q = static_cast<uint8_t>(code(gen));
  for (size_t i = 0; i < l.zeros.size(); ++i) {
    l.zeros[i] = zp(gen);
    const float s = sd(gen);  // bf16 scales: a value both fp16 and bf16 hold exactly
    s16[i] = fr::float_to_fp16(sdt == fr::DType::BF16 ? fr::round_to_dtype(fr::DType::BF16, s) : s);
    l.scale_f[i] = fr::fp16_to_float(s16[i]);  // exact in every scale dtype
  }
  c.codes = l.codes.data();
  c.scales = s16.data();
  c.zeros = l.zeros.data();
  c.pad_zero = 1 << (bits - 1);
  std::vector<uint16_t> st(static_cast<size_t>(groups * out));
  if (layout == fi::WoqLayout::Awq) {
    l.qweight.resize(static_cast<size_t>(in * out / 8));
    l.qzeros.resize(static_cast<size_t>(groups * out / 8));
    fr::pack_awq(c, l.qweight.data(), l.qzeros.data(), st.data());
  } else {
    l.qweight.resize(static_cast<size_t>(c.cols_p() / pf * out));
    l.qzeros.resize(static_cast<size_t>(groups * c.rows_p() / pf));
    fr::pack_gptq(c, layout == fi::WoqLayout::Gptq ? 1 : 0, l.qweight.data(), l.qzeros.data(), st.data());
  }
  l.scales.resize(st.size() * static_cast<size_t>(fr::dtype_bits(sdt) / 8));
  std::vector<float> sf(st.size());
  for (size_t i = 0; i < st.size(); ++i) sf[i] = fr::fp16_to_float(st[i]);
  if (sdt == fr::DType::F16) std::memcpy(l.scales.data(), st.data(), st.size() * 2);
  else fr::store_from_float(sdt, sf.data(), static_cast<int64_t>(sf.size()), l.scales.data(), 0);

  if (tiled) {
    const int64_t rows = static_cast<int64_t>(l.qweight.size()) / out;
    std::vector<int32_t> t(l.qweight.size()), back(l.qweight.size());
    fi::woq_tile_qweight(l.qweight.data(), rows, out, t.data());
    fi::woq_untile_qweight(t.data(), rows, out, back.data());
    check(back == l.qweight && (out == fi::kWoqTile || t != l.qweight), "tile / untile round trip out" + std::to_string(out));
    l.qweight = t;
    l.view.tile = fi::kWoqTile;
  }
  l.view.layout = layout;
  l.view.bits = bits;
  l.view.qweight = l.qweight.data();
  l.view.qzeros = l.qzeros.data();
  l.view.scales = l.scales.data();
  l.view.scale_dtype = sdt;
  const int64_t qw[2] = {layout == fi::WoqLayout::Awq ? in : c.cols_p() / pf,
                         layout == fi::WoqLayout::Awq ? out / 8 : out};
  const int64_t qz[2] = {groups, static_cast<int64_t>(l.qzeros.size()) / groups};
  const int64_t sc[2] = {groups, out};
  fi::woq_resolve(l.view, in, group_size, qw, qz, sc, "test");
  return l;
}

const char* name(fr::DType d) {
  return d == fr::DType::F32 ? "f32" : d == fr::DType::BF16 ? "bf16" : "f16";
}

void layer_case(fi::WoqLayout layout, int bits, int64_t in, int64_t out, int64_t gs, fr::DType sdt, uint32_t seed,
                bool tiled = false) {
  const Layer l = make_layer(layout, bits, in, out, gs, sdt, seed, tiled);
  const fi::WoqWeightView& w = l.view;
  const std::string tag = std::string(fi::woq_layout_name(layout)) + (tiled ? "_tiled" : "") + " b" + std::to_string(bits) + " in" +
                          std::to_string(in) + " out" + std::to_string(out) + " g" + std::to_string(gs) + " s" +
                          name(sdt);
  // The decoder reads back what the packer was given.
  bool decode_ok = w.groups == static_cast<int64_t>(l.zeros.size()) / out;
  for (int64_t o = 0; o < out && decode_ok; ++o)
    for (int64_t k = 0; k < in; ++k) {
      const int64_t g = k / w.group;
      const float want = (static_cast<float>(l.codes[o * in + k]) - static_cast<float>(l.zeros[o * w.groups + g])) *
                         l.scale_f[o * w.groups + g];
      if (fi::woq_code(w, k, o) != l.codes[o * in + k] || fi::woq_zero(w, g, o) != l.zeros[o * w.groups + g] ||
          fi::woq_weight(w, k, o) != want) {
        decode_ok = false;
        break;
      }
    }
  check(decode_ok, tag + " decode");

  for (fr::DType dt : {fr::DType::F32, fr::DType::BF16}) {
    const size_t bytes = static_cast<size_t>(in * out * (fr::dtype_bits(dt) / 8));
    std::vector<uint8_t> ref(bytes), got(bytes);
    fi::woq_dequantize_ref(w, dt, ref.data());
    for (fr::Isa isa : {fr::Isa::Scalar, fr::Isa::Avx2, fr::Isa::Avx512}) {
      if (!fr::cpu_supports(isa)) continue;
      std::fill(got.begin(), got.end(), 0xAB);
      fi::woq_dequantize(w, dt, got.data(), isa);
      check(got == ref, tag + " dequantize " + name(dt) + " " + fr::isa_name(isa));
    }
  }

  std::mt19937 gen(seed + 7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t m : {1, 2, 3, 5, 9}) {
    std::vector<float> xf(static_cast<size_t>(m * in)), bias(static_cast<size_t>(out));
    for (auto& v : xf) v = nd(gen);
    for (auto& v : bias) v = nd(gen);
    for (fr::DType xdt : {fr::DType::F32, fr::DType::BF16, fr::DType::F16}) {
      if (xdt != fr::DType::F32 && m > 2) continue;
      const size_t xb = static_cast<size_t>(fr::dtype_bits(xdt) / 8);
      std::vector<uint8_t> x(xf.size() * xb), yref(static_cast<size_t>(m * out) * xb), y(yref.size());
      fr::store_from_float(xdt, xf.data(), static_cast<int64_t>(xf.size()), x.data(), 0);
      std::vector<float> xr(xf.size());
      fr::load_as_float(xdt, x.data(), 0, static_cast<int64_t>(xf.size()), xr.data());
      fi::WoqGemvArgs a;
      a.dtype = xdt;
      a.m = m;
      a.x = x.data();
      a.bias = (m % 2) ? bias.data() : nullptr;
      a.y = yref.data();
      fi::woq_linear_ref(w, a);
      // Bound per output: fp32 summation error of sum |x * w| (both orders), plus one rounding of the output dtype.
      std::vector<float> bound(static_cast<size_t>(m * out));
      for (int64_t r = 0; r < m; ++r)
        for (int64_t o = 0; o < out; ++o) {
          double s = 0;
          for (int64_t k = 0; k < in; ++k) s += std::fabs(xr[r * in + k] * fi::woq_weight(w, k, o));
          bound[r * out + o] = static_cast<float>(s * 4e-6 + 1e-6);
        }
      std::vector<float> yr(static_cast<size_t>(m * out)), yg(yr.size());
      fr::load_as_float(xdt, yref.data(), 0, m * out, yr.data());
      const float ulp = xdt == fr::DType::BF16 ? 1.0f / 128 : xdt == fr::DType::F16 ? 1.0f / 1024 : 0.0f;
      for (fr::Isa isa : {fr::Isa::Scalar, fr::Isa::Avx2, fr::Isa::Avx512}) {
        if (!fr::cpu_supports(isa)) continue;
        std::vector<uint8_t> first;
        for (int threads : {1, 2, 3}) {
          fr::set_num_threads(threads);
          a.y = y.data();
          fi::woq_gemv(w, a, isa);
          fr::load_as_float(xdt, y.data(), 0, m * out, yg.data());
          float worst = 0;
          bool ok = true;
          for (size_t i = 0; i < yr.size(); ++i) {
            const float tol = bound[i] + ulp * std::fabs(yr[i]);
            if (!(std::fabs(yg[i] - yr[i]) <= tol)) ok = false;
            worst = std::max(worst, std::fabs(yg[i] - yr[i]) / tol);
          }
          const std::string t = tag + " gemv m" + std::to_string(m) + " x" + name(xdt) + " " + fr::isa_name(isa) +
                                " t" + std::to_string(threads);
          if (!ok) std::printf("  worst |err|/tol %.3g\n", worst);
          check(ok, t);
          if (threads == 1) first = y;
          else check(y == first, t + " same bits as 1 thread");
        }
      }
    }
  }
}

}  // namespace

int main() {
  using L = fi::WoqLayout;
  const fr::DType F16 = fr::DType::F16, BF16 = fr::DType::BF16, F32 = fr::DType::F32;
  uint32_t seed = 1;
  for (L layout : {L::Gptq, L::GptqV2})
    for (int bits : {2, 4, 8}) {
      layer_case(layout, bits, 256, 64, 128, F16, seed++);
      layer_case(layout, bits, 256, 200, 32, F16, seed++);   // vector blocks + element tail
      layer_case(layout, bits, 200, 64, 64, F16, seed++);    // partial last group, padded input words
      layer_case(layout, bits, 96, 136, -1, F16, seed++);    // per channel
      layer_case(layout, bits, 384, 1024, 128, F16, seed++); // few blocks: groups split across tasks
    }
  for (int bits : {2, 4, 8}) {
    const L layout = bits == 4 ? L::Gptq : L::GptqV2;
    layer_case(layout, bits, 256, 64, 128, F16, seed++, true);   // one tile
    layer_case(layout, bits, 200, 192, 64, BF16, seed++, true);  // padded input words, three tiles
    layer_case(layout, bits, 96, 128, -1, F16, seed++, true);    // per channel
  }
  layer_case(L::Gptq, 4, 384, 1024, 128, F16, seed++, true);  // groups split across tasks
  layer_case(L::Gptq, 4, 256, 64, 4, F16, seed++, true);  // groups shorter than a word: scalar GEMV on tiles
  layer_case(L::Gptq, 4, 260, 72, -1, F16, seed++);  // per channel, inputs not whole words: scalar GEMV
  layer_case(L::Gptq, 4, 256, 64, 4, F16, seed++);   // groups shorter than a word: scalar GEMV
  layer_case(L::Gptq, 4, 256, 128, 64, BF16, seed++);
  layer_case(L::GptqV2, 8, 256, 128, 64, F32, seed++);
  layer_case(L::Awq, 4, 256, 256, 128, F16, seed++);
  layer_case(L::Awq, 4, 256, 136, 32, F16, seed++);   // one 128-output block + tail
  layer_case(L::Awq, 4, 200, 64, 40, BF16, seed++);   // fewer outputs than a block
  layer_case(L::Awq, 4, 128, 1024, -1, F32, seed++);  // per channel, groups split
  layer_case(L::Awq, 4, 512, 2048, 128, F16, seed++);

  // Bad layouts are refused with the tensor named.
  auto refused = [](const char* what, auto fn) {
    try {
      fn();
      check(false, std::string("refused: ") + what);
    } catch (const fr::OptionError& e) {
      check(std::string(e.what()).find(what) != std::string::npos, std::string("refused: ") + what + " -> " + e.what());
    }
  };
  refused("qzeros", [] {
    fi::WoqWeightView v;
    const int64_t qw[2] = {32, 64}, qz[2] = {2, 7}, sc[2] = {2, 64};
    fi::woq_resolve(v, 256, 128, qw, qz, sc, "t");
  });
  refused("scales", [] {
    fi::WoqWeightView v;
    const int64_t qw[2] = {32, 64}, qz[2] = {2, 8}, sc[2] = {1, 64};
    fi::woq_resolve(v, 256, 128, qw, qz, sc, "t");
  });
  refused("qweight", [] {
    fi::WoqWeightView v;
    const int64_t qw[2] = {16, 64}, qz[2] = {2, 8}, sc[2] = {2, 64};
    fi::woq_resolve(v, 256, 128, qw, qz, sc, "t");
  });
  refused("bits", [] {
    fi::WoqWeightView v;
    v.layout = fi::WoqLayout::Awq;
    v.bits = 2;
    const int64_t qw[2] = {256, 4}, qz[2] = {2, 4}, sc[2] = {2, 64};
    fi::woq_resolve(v, 256, 128, qw, qz, sc, "t");
  });
  refused("layout", [] { fi::parse_woq_layout("marlin", "t"); });
  refused("layout", [] {
    bool tiled = false;
    fi::parse_woq_layout("awq_tiled", "t", &tiled);
  });
  refused("layout", [] { fi::parse_woq_layout("gptq_tiled", "t"); });  // a caller that reads no tiles
  refused("qweight", [] {  // tiles need whole tiles of outputs
    fi::WoqWeightView v;
    v.tile = fi::kWoqTile;
    const int64_t qw[2] = {32, 72}, qz[2] = {2, 9}, sc[2] = {2, 72};
    fi::woq_resolve(v, 256, 128, qw, qz, sc, "t");
  });
  {
    bool tiled = false;
    const fi::WoqLayout l = fi::parse_woq_layout("gptq_v2_tiled", "t", &tiled);
    check(l == L::GptqV2 && tiled, "parse gptq_v2_tiled");
    check(fi::parse_woq_layout("gptq", "t", &tiled) == L::Gptq && !tiled, "parse gptq");
  }
  return fastround::test::report();
}
