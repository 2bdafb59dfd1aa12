// SignRound's MXFP / NVFP4_E5M3 tuning kernels (fastround/tune/fp_qdq): for MXFP4, MXFP8 and NVFP4_E5M3, every input dtype, with and
// without V and range factors (some clamped to 0, which zeroes a group's range), inputs with all-zero groups,
// exact ties of the group maximum, values far outside the element range and tiny ones near the private-exponent
// floor, the row-parallel forward and backward equal their group-by-group references bit for bit at 1 and 3
// threads. Plain C++; tests/test_tune_fp_ops.py runs it. Ends with "N passed, N failed".
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/tune/fp_qdq.h"
#include "test_harness.h"

namespace fr = fastround;
namespace ft = fastround::tune;

using fastround::test::check;
using fastround::test::same_bytes;

namespace {

// nv4: NVFP4 (E4M3 scales under the data's global scale); nv without it: NVFP4_E5M3.
void qdq_case(fr::DType dt, int bits, bool nv, bool with_v, bool with_factor, uint32_t seed, bool nv4 = false) {
  const int64_t group = nv ? 16 : 32, rows = 11, cols = 96, ng = rows * cols / group;
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, bits == 4 ? 0.05f : 3.0f);
  std::uniform_real_distribution<float> uv(-0.6f, 0.6f), uf(0.3f, 1.0f);
  std::vector<float> xf(static_cast<size_t>(rows * cols));
  for (auto& x : xf) x = nd(gen);
  for (int64_t c = 0; c < 32; ++c) xf[c] = 0.0f;                         // an all-zero group
  for (int64_t c = 32; c < 64; ++c) xf[c] = (c % 3 ? 0.25f : -0.25f);    // tied maxima
  const bool f16 = dt == fr::DType::F16;  // within fp16's range: its subnormals, its largest finite values
  for (int64_t c = 0; c < cols; ++c) xf[2 * cols + c] = (f16 ? 1e-7f : 1e-30f) * static_cast<float>(c + 1);
  xf[3 * cols + 5] = f16 ? 60000.0f : 1e30f;                             // an exponent far above the rest
  std::vector<uint8_t> x(xf.size() * static_cast<size_t>(fr::dtype_bits(dt) / 8));
  fr::store_from_float(dt, xf.data(), rows * cols, x.data(), 0);
  std::vector<float> vv(static_cast<size_t>(ng * group)), f(static_cast<size_t>(ng));
  for (auto& a : vv) a = uv(gen);
  for (int64_t i = 0; i < ng; ++i) f[i] = i % 7 == 0 ? 1.0f : (i % 11 == 3 ? 0.0f : uf(gen));
  std::vector<float> gf(xf.size());
  for (auto& a : gf) a = nd(gen);
  std::vector<uint8_t> grad(x.size());
  fr::store_from_float(dt, gf.data(), rows * cols, grad.data(), 0);

  ft::FpQdqParams p;
  p.bits = bits;
  p.nv_e5m3 = nv && !nv4;
  p.nv_fp4 = nv4;
  if (nv4) {  // 448 * 6 / max|x| of the stored values, as upstream's calculate_gparam
    float amax = 0.0f;
    for (int64_t i = 0; i < rows * cols; ++i) amax = std::max(amax, std::fabs(fr::element_as_float(dt, x.data(), i)));
    p.global_scale = 2688.0f * (1.0f / amax);
  }
  ft::FpQdqView v;
  v.dtype = dt;
  v.x = x.data();
  v.rows = rows;
  v.cols = cols;
  v.v = with_v ? vv.data() : nullptr;
  v.max_scale = with_factor ? f.data() : nullptr;
  const std::string name = std::string(fr::dtype_name(dt)) + (nv4 ? " nvfp4" : nv ? " nvfp4_e5m3" : " mxfp" + std::to_string(bits)) +
                           (with_v ? " v" : "") +
                           (with_factor ? " factor" : "");

  std::vector<uint8_t> q_ref(x.size()), codes_ref(xf.size()), sc_ref(ng), gx_ref(x.size());
  std::vector<float> e_ref(ng), gv_ref(vv.size()), gm_ref(ng);
  ft::fp_qdq_forward_ref(v, p, q_ref.data(), e_ref.data(), codes_ref.data(), sc_ref.data());
  ft::fp_qdq_backward_ref(v, p, grad.data(), gv_ref.data(), gm_ref.data(), gx_ref.data());
  fastround::test::at_thread_counts(name, [&](const std::string& t) {
    std::vector<uint8_t> q(x.size()), codes(xf.size()), sc(ng), gx(x.size());
    std::vector<float> e(ng), gv(vv.size()), gm(ng);
    ft::fp_qdq_forward(v, p, q.data(), e.data(), codes.data(), sc.data());
    check(same_bytes(q, q_ref) && same_bytes(e, e_ref), t + ": forward == reference");
    check(same_bytes(codes, codes_ref) && same_bytes(sc, sc_ref), t + ": codes and scales == reference");
    ft::fp_qdq_backward(v, p, grad.data(), gv.data(), gm.data(), gx.data());
    check(same_bytes(gv, gv_ref), t + ": grad_v == reference");
    check(same_bytes(gm, gm_ref), t + ": grad_max == reference");
    check(same_bytes(gx, gx_ref), t + ": grad_x == reference");
    // Only what is asked for is computed, and it does not change.
    std::vector<float> gv2(vv.size());
    ft::fp_qdq_backward(v, p, grad.data(), gv2.data(), nullptr, nullptr);
    check(same_bytes(gv2, gv_ref), t + ": grad_v alone == reference");
  });
  // The codes stand for the qdq: code value * 2^e equals the stored qdq (up to the sign of zero); NVFP4's
  // multiplier is 1 / (1 / (scale * (1 / gs))), the forward's.
  const auto recip = [](float a) { return a == 0.0f ? 0.0f : 1.0f / a; };
  bool decodes = true;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float s = nv4  ? recip(recip(fr::fp8_e4m3_to_float(sc_ref[i / group]) * recip(p.global_scale)))
                    : nv ? fr::ue5m3_decode(sc_ref[i / group])
                         : std::ldexp(1.0f, static_cast<int>(sc_ref[i / 32]) - 127);
    const float val = bits == 4 ? fr::e2m1_to_float(codes_ref[i]) : fr::fp8_e4m3_to_float(codes_ref[i]);
    const float q = fr::element_as_float(dt, q_ref.data(), i);
    if (fr::round_to_dtype(dt, val * s) != q && !(q == 0.0f && val == 0.0f)) decodes = false;
  }
  check(decodes, name + ": codes decode to the qdq");
}

void bad_input() {
  ft::FpQdqParams p;
  ft::FpQdqView v;
  std::vector<float> x(64), q(64), e(2);
  v.dtype = fr::DType::F32;
  v.x = x.data();
  v.rows = 2;
  v.cols = 30;
  bool threw = false;
  try {
    ft::fp_qdq_forward(v, p, q.data(), e.data());
  } catch (const fr::OptionError&) {
    threw = true;
  }
  check(threw, "columns not a multiple of 32 are refused");
  v.cols = 32;
  p.bits = 6;
  threw = false;
  try {
    ft::fp_qdq_forward(v, p, q.data(), e.data());
  } catch (const fr::OptionError&) {
    threw = true;
  }
  check(threw, "bits other than 4 and 8 are refused");
}

}  // namespace

int main() {
  uint32_t seed = 1;
  for (fr::DType dt : {fr::DType::BF16, fr::DType::F16, fr::DType::F32})
    for (int kind : {4, 8, 16, 17})  // MXFP4, MXFP8, NVFP4_E5M3, NVFP4
      for (bool with_v : {false, true})
        for (bool with_factor : {false, true})
          qdq_case(dt, kind == 8 ? 8 : 4, kind >= 16, with_v, with_factor, seed++, kind == 17);
  bad_input();
  return fastround::test::report();
}
