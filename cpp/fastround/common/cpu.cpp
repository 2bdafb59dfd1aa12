#include "fastround/common/cpu.h"

#include <atomic>
#include <cstdlib>

#include "fastround/common/error.h"

namespace fastround {

namespace {

constexpr int kUnset = -1;
std::atomic<int> g_isa{kUnset};

Isa parse_isa(const std::string& name, const char* site) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  throw OptionError(std::string(site) + ": unknown instruction set '" + name + "' (expected scalar, avx2 or avx512)");
}

void require(Isa isa, const char* site) {
  if (!cpu_supports(isa))
    throw OptionError(std::string(site) + ": this CPU cannot run the " + isa_name(isa) + " kernels (best here: " +
                      isa_name(best_isa()) + ")");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // idempotent; needed when called before libgcc's constructor ran
#endif
  switch (isa) {
    case Isa::Scalar: return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // The AVX2 kernels also convert fp16 with F16C; the AVX-512 ones use the VL/BW/DQ forms on 256-bit registers.
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return cpu_supports(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    default: return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (cpu_supports(Isa::Avx512)) return Isa::Avx512;
  if (cpu_supports(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v != kUnset) return static_cast<Isa>(v);
  Isa isa = best_isa();
  if (const char* env = std::getenv("FASTROUND_ISA"); env != nullptr && *env != '\0') {
    isa = parse_isa(env, "FASTROUND_ISA");
    require(isa, "FASTROUND_ISA");
  }
  int expected = kUnset;
  g_isa.compare_exchange_strong(expected, static_cast<int>(isa));
  return static_cast<Isa>(g_isa.load());
}

void set_isa(Isa isa) {
  require(isa, "set_isa");
  g_isa.store(static_cast<int>(isa));
}

void set_isa(const std::string& name) { set_isa(parse_isa(name, "set_isa")); }

}  // namespace fastround
