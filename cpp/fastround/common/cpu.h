// The one place that decides which instruction set the kernels use. Detection runs once; FASTROUND_ISA
// (scalar|avx2|avx512) or set_isa() overrides it, and asking for an ISA this CPU lacks throws OptionError.
#pragma once

#include <string>

namespace fastround {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa);
bool cpu_supports(Isa isa);
Isa best_isa();
// The ISA kernels dispatch on now: FASTROUND_ISA when set (read at the first call), else best_isa().
Isa active_isa();
// Throws OptionError for an unknown name or an ISA the CPU cannot run; the previous choice then stays.
void set_isa(Isa isa);
void set_isa(const std::string& name);

}  // namespace fastround
