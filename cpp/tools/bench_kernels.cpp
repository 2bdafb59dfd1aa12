// fastround-bench-kernels [ROWS COLS [KERNEL_SUBSTRING]]: GB/s of bf16 source through each quantize+pack kernel, the scalar
// reference (one thread) beside the fast path on every instruction set this CPU runs (one thread each) and
// on the best one at 1..N threads. Prints one JSON object per line.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "fastround/common/cpu.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/parallel.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/quant/int_rtn.h"

namespace fr = fastround;

namespace {

double seconds_per_run(const std::function<void()>& fn) {
  fn();  // warm-up: page in outputs, spin up the thread pool
  int reps = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    fn();
    ++reps;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (elapsed < 0.5 && reps < 50);
  return elapsed / reps;
}

void report(const std::string& kernel, const std::string& path, fr::Isa isa, int threads, double secs, double bytes) {
  std::printf(
      "{\"kernel\": \"%s\", \"path\": \"%s\", \"isa\": \"%s\", \"threads\": %d, \"seconds\": %.6f, "
      "\"gb_per_s\": %.3f}\n",
      kernel.c_str(), path.c_str(), fr::isa_name(isa), threads, secs, bytes / secs / 1e9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 2 ? std::atoll(argv[1]) : 4096;
  const int64_t cols = argc > 2 ? std::atoll(argv[2]) : 4096;
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& v : w) v = fr::float_to_bf16(normal(rng));
  const double bytes = static_cast<double>(w.size()) * 2;
  const int max_t = fr::max_threads();
  std::vector<int> thread_counts;
  for (int t = 1; t < max_t; t *= 2) thread_counts.push_back(t);
  thread_counts.push_back(max_t);

  struct Kernel {
    std::string name;
    std::function<void(bool reference)> run;
  };
  std::vector<Kernel> kernels;
  std::vector<int32_t> qweight, qzeros;
  std::vector<uint16_t> scales;
  for (int bits : {2, 4, 8})
    for (bool sym : {true, false}) {
      const fr::IntQuantParams p{bits, bits == 2 ? 64 : 128, sym, sym ? 1 : 0};
      kernels.push_back({"int" + std::to_string(bits) + (sym ? "_sym" : "_asym") + "_g" + std::to_string(p.group_size),
                         [&, p](bool reference) {
                           const fr::IntGptqLayout L = fr::int_gptq_layout(rows, cols, p, "bench");
                           qweight.resize(L.qweight_elems());
                           qzeros.resize(L.qzeros_elems());
                           scales.resize(L.scales_elems());
                           (reference ? fr::quantize_int_gptq_ref : fr::quantize_int_gptq)(
                               fr::DType::BF16, w.data(), L, p, qweight.data(), qzeros.data(), scales.data());
                         }});
    }
  std::vector<uint8_t> out_a(static_cast<size_t>(rows * cols)), out_b(static_cast<size_t>(rows * cols / 16));
  for (int bits : {4, 8})
    for (bool opt : {false, true})
      kernels.push_back({"mxfp" + std::to_string(bits) + (opt ? "_optrtn" : "_plain"), [&, bits, opt](bool reference) {
                           const fr::MxfpLayout L = fr::mxfp_layout(rows, cols, bits);
                           (reference ? fr::quantize_mxfp_ref : fr::quantize_mxfp)(fr::DType::BF16, w.data(), L, opt,
                                                                                  out_a.data(), out_b.data());
                         }});
  for (bool opt : {false, true})
    kernels.push_back({std::string("nvfp4_e5m3") + (opt ? "_optrtn" : "_plain"), [&, opt](bool reference) {
                         (reference ? fr::quantize_nvfp4_e5m3_ref : fr::quantize_nvfp4_e5m3)(
                             fr::DType::BF16, w.data(), rows, cols, opt, out_a.data(), out_b.data());
                       }});

  const fr::Isa best = fr::active_isa();
  std::vector<fr::Isa> isas;
  for (fr::Isa isa : {fr::Isa::Scalar, fr::Isa::Avx2, fr::Isa::Avx512})
    if (isa != best && fr::cpu_supports(isa)) isas.push_back(isa);
  const std::string only = argc > 3 ? argv[3] : "";
  for (const auto& k : kernels) {
    if (k.name.find(only) == std::string::npos) continue;
    fr::set_num_threads(1);
    report(k.name, "reference", fr::Isa::Scalar, 1, seconds_per_run([&] { k.run(true); }), bytes);
    for (fr::Isa isa : isas) {
      fr::set_isa(isa);
      report(k.name, "fast", isa, 1, seconds_per_run([&] { k.run(false); }), bytes);
    }
    fr::set_isa(best);
    for (int t : thread_counts) {
      fr::set_num_threads(t);
      report(k.name, "fast", best, t, seconds_per_run([&] { k.run(false); }), bytes);
    }
  }
  return 0;
}
