#include "fastround/quant/simd.h"

namespace fastround::simd {

const Kernels* kernels_for(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::Avx2: return &kAvx2;
    case Isa::Avx512: return &kAvx512;
    default: return nullptr;
  }
#else
  (void)isa;
  return nullptr;
#endif
}

const Kernels* active_kernels() { return kernels_for(active_isa()); }

}  // namespace fastround::simd
