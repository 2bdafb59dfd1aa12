// SignRound's tuning kernels (fastround/tune): for every weight dtype, scale dtype, bits, group layout (a padded
// last group included), sym and asym, with random V and factors (some at the clamp edges and ties), the
// row-parallel forward and backward equal their element-by-element references bit for bit at 1 and several
// threads; the sign-SGD step equals its reference with and without momentum and clamping (to 1 and to
// SignRoundV2's 2). SignRoundV2 (enable_alg_ext): the init-scale search (OPT-RTN's, the imatrix as given, zeros
// included, with either floor) fast == reference and codes == a scales-only run, and the qdq with an init scale
// (max_scale in [0, 2]) forward and backward == reference. Plain C++; tests/test_tune_ops.py runs it. Ends with
// "N passed, N failed".
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/convert.h"
#include "fastround/quant/codes.h"
#include "fastround/quant/int_opt_rtn.h"
#include "fastround/tune/int_qdq.h"
#include "fastround/tune/sign_sgd.h"
#include "test_harness.h"

namespace fr = fastround;
namespace ft = fastround::tune;

using fastround::test::check;
using fastround::test::same_bytes;

namespace {

// SignRoundV2's init scales [rows * groups] as fp32 (the search's weight-dtype values), from the fast search; the
// reference search must agree, and so must the codes of a run that writes them.
std::vector<float> init_scales(fr::DType dt, const std::vector<uint8_t>& w, int64_t rows, int64_t cols, int bits,
                               int64_t group_size, float thresh, const std::string& name) {
  const fr::IntGrouping g = fr::int_grouping(rows, cols, group_size, "test");
  std::vector<float> imatrix(static_cast<size_t>(cols));
  std::mt19937 gen(static_cast<uint32_t>(cols + bits));
  std::uniform_real_distribution<float> u(0.0f, 40.0f);
  for (int64_t c = 0; c < cols; ++c) imatrix[c] = c % 9 == 0 ? 0.0f : u(gen);  // zeros stay zeros
  fr::OptRtnOptions opt;
  opt.fix_zero_imatrix = false;
  opt.scale_thresh = thresh;
  const size_t es = static_cast<size_t>(fr::dtype_bits(dt) / 8);
  const size_t ns = static_cast<size_t>(rows * g.groups);
  std::vector<uint8_t> fast(ns * es), ref(ns * es), with_codes(ns * es), codes(static_cast<size_t>(rows * cols));
  std::vector<uint8_t> codes_ref(codes.size());
  fr::int_opt_rtn(dt, w.data(), g, bits, imatrix.data(), nullptr, fast.data(), opt);
  fr::int_opt_rtn_ref(dt, w.data(), g, bits, imatrix.data(), codes_ref.data(), ref.data(), opt);
  fr::int_opt_rtn(dt, w.data(), g, bits, imatrix.data(), codes.data(), with_codes.data(), opt);
  check(same_bytes(fast, ref) && same_bytes(with_codes, ref) && same_bytes(codes, codes_ref),
        name + ": init-scale search fast == reference");
  // The fixed-up imatrix (OPT-RTN) must weigh differently somewhere, or the option would be untested.
  std::vector<uint8_t> fixed(ns * es);
  fr::int_opt_rtn(dt, w.data(), g, bits, imatrix.data(), nullptr, fixed.data());
  if (thresh == 1e-5f) check(!same_bytes(fixed, fast), name + ": the zero fix-up is off");
  std::vector<float> out(ns);
  fr::load_as_float(dt, fast.data(), 0, static_cast<int64_t>(ns), out.data());
  return out;
}

void qdq_case(fr::DType dt, fr::DType sd, int bits, int64_t group_size, bool sym, bool factors, uint32_t seed,
              bool init = false) {
  const int64_t rows = 13, cols = 200;
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::uniform_real_distribution<float> uv(-0.6f, 0.6f), uf(0.4f, 1.0f);
  std::vector<float> wf(static_cast<size_t>(rows * cols));
  for (auto& x : wf) x = nd(gen);
  for (int64_t c = 0; c < cols; ++c) wf[c] = 0.0f;                                     // an all-zero row
  for (int64_t c = 0; c < cols; ++c) wf[cols + c] = (c % 2 ? 0.1f : -0.1f);            // tied extremes
  std::vector<uint8_t> w(wf.size() * static_cast<size_t>(fr::dtype_bits(dt) / 8));
  fr::store_from_float(dt, wf.data(), rows * cols, w.data(), 0);
  ft::IntQdqParams p;
  p.bits = bits;
  p.group_size = group_size;
  p.sym = sym;
  p.scale_dtype = sd;
  p.scale_thresh = sd == fr::DType::F32 ? 1e-8f : 1e-5f;
  ft::IntQdqView v;
  v.dtype = dt;
  v.weight = w.data();
  v.rows = rows;
  v.cols = cols;
  ft::int_qdq_layout(v, p, "test");
  const int64_t ng = rows * v.groups;
  std::vector<float> vv(static_cast<size_t>(ng * v.group)), smin(ng), smax(ng), wmin(ng), wmax(ng);
  for (auto& x : vv) x = uv(gen);
  for (int64_t i = 0; i < ng; ++i) {
    smin[i] = i % 7 == 0 ? 1.0f : uf(gen);
    smax[i] = i % 5 == 0 ? smin[i] : uf(gen);
    if (init) smax[i] = i % 11 == 0 ? 2.0f : (i % 13 == 0 ? 0.0f : 2.0f * uf(gen) - 0.3f);  // [0, 2], both ends
  }
  ft::int_group_extremes(dt, w.data(), rows, cols, v.group, v.groups, wmin.data(), wmax.data());
  v.v = vv.data();
  v.min_scale = factors ? smin.data() : nullptr;
  v.max_scale = factors ? smax.data() : nullptr;
  v.wmin = wmin.data();
  v.wmax = wmax.data();
  const size_t wbytes = w.size();
  std::vector<float> grad_f(wf.size());
  for (auto& x : grad_f) x = nd(gen);
  std::vector<uint8_t> grad(wbytes);
  fr::store_from_float(dt, grad_f.data(), rows * cols, grad.data(), 0);

  const std::string name = std::string(fr::dtype_name(dt)) + "/" + std::string(fr::dtype_name(sd)) + " b" +
                           std::to_string(bits) + " g" + std::to_string(group_size) + (sym ? " sym" : " asym") +
                           (factors ? " factors" : "") + (init ? " init-scale" : "");
  std::vector<float> init_s;
  if (init) {
    init_s = init_scales(dt, w, rows, cols, bits, group_size, p.scale_thresh, name);
    v.init_scale = init_s.data();
  }
  std::vector<uint8_t> q_ref(wbytes), codes_ref(static_cast<size_t>(rows * cols));
  std::vector<float> s_ref(ng);
  std::vector<int32_t> z_ref(ng);
  ft::int_qdq_forward_ref(v, p, q_ref.data(), s_ref.data(), codes_ref.data(), z_ref.data());
  std::vector<float> gv_ref(vv.size()), gmin_ref(ng), gmax_ref(ng);
  ft::int_qdq_backward_ref(v, p, grad.data(), gv_ref.data(), gmin_ref.data(), gmax_ref.data());
  bool moved = false;
  for (float g : gmax_ref) moved |= g != 0.0f;
  check(moved, name + ": the factors get a gradient");
  fastround::test::at_thread_counts(name, [&](const std::string& t) {
    std::vector<uint8_t> q(wbytes), codes(static_cast<size_t>(rows * cols));
    std::vector<float> s(ng);
    std::vector<int32_t> z(ng);
    ft::int_qdq_forward(v, p, q.data(), s.data(), codes.data(), z.data());
    check(same_bytes(q, q_ref) && same_bytes(s, s_ref), t + ": forward == reference");
    check(same_bytes(codes, codes_ref) && same_bytes(z, z_ref), t + ": codes == reference");
    std::vector<float> gv(vv.size()), gmin(ng), gmax(ng);
    ft::int_qdq_backward(v, p, grad.data(), gv.data(), gmin.data(), gmax.data());
    check(same_bytes(gv, gv_ref) && same_bytes(gmin, gmin_ref) && same_bytes(gmax, gmax_ref),
          t + ": backward == reference");
  });
}

void sgd_case(float momentum, bool clamp01, float clamp_hi = 1.0f) {
  const int64_t n = 200003;  // several chunks and a partial one
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> p(n), g(n);
  for (auto& x : p) x = clamp01 ? clamp_hi * (0.5f + 0.5f * u(gen)) : u(gen);
  for (int64_t i = 0; i < n; ++i) g[i] = i % 11 == 0 ? 0.0f : u(gen);
  std::vector<float> p_ref = p, p_fast = p, b_ref(n), b_fast(n);
  ft::SignSgdParams s;
  s.lr = 0.005f;
  s.momentum = momentum;
  s.clamp01 = clamp01;
  s.clamp_hi = clamp_hi;
  for (int step = 0; step < 3; ++step) {
    s.first = step == 0;
    ft::sign_sgd_step_ref(p_ref.data(), g.data(), momentum ? b_ref.data() : nullptr, n, s);
    ft::sign_sgd_step(p_fast.data(), g.data(), momentum ? b_fast.data() : nullptr, n, s);
  }
  const std::string name = "sign_sgd momentum " + std::to_string(momentum) +
                           (clamp01 ? " clamp to " + std::to_string(clamp_hi) : "");
  check(same_bytes(p_ref, p_fast) && same_bytes(b_ref, b_fast), name + ": fast == reference");
  bool in_range = true, above_one = false;
  for (float x : p_fast) {
    in_range &= !clamp01 || (x >= 0.0f && x <= clamp_hi);
    above_one |= x > 1.0f;
  }
  check(in_range, name + ": clamped to [0, clamp_hi]");
  if (clamp01 && clamp_hi > 1.0f) check(above_one, name + ": factors above 1 stay");
  // A zero gradient leaves the parameter where it was (sign(0) = 0), as torch.sign does.
  if (momentum == 0) check(p_fast[0] == p[0] || (clamp01 && p[0] > clamp_hi), name + ": zero gradient, no move");
}

}  // namespace

int main() {
  for (fr::DType dt : {fr::DType::F32, fr::DType::BF16, fr::DType::F16})
    for (fr::DType sd : {fr::DType::F16, fr::DType::F32, fr::DType::BF16})
      for (int bits : {2, 4, 8})
        for (int64_t gs : {int64_t{32}, int64_t{64}, int64_t{-1}})
          for (bool sym : {true, false})
            for (bool factors : {true, false})
              qdq_case(dt, sd, bits, gs, sym, factors, static_cast<uint32_t>(bits * 131 + gs + (sym ? 7 : 0)));
  // SignRoundV2: sym only, max_scale tuned in [0, 2] on top of the searched init scale.
  for (fr::DType dt : {fr::DType::F32, fr::DType::BF16, fr::DType::F16})
    for (fr::DType sd : {fr::DType::F16, fr::DType::F32, fr::DType::BF16})
      for (int bits : {2, 4, 8})
        for (int64_t gs : {int64_t{32}, int64_t{64}, int64_t{-1}})
          qdq_case(dt, sd, bits, gs, true, true, static_cast<uint32_t>(bits * 17 + gs), true);
  for (float m : {0.0f, 0.9f})
    for (bool c : {false, true}) sgd_case(m, c);
  for (float m : {0.0f, 0.9f}) sgd_case(m, true, 2.0f);
  return fastround::test::report();
}
