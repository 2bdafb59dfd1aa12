// The avx2 kernel table: simd_kernels.inc compiled for avx2 (see there for why headers come first).
#include "fastround/quant/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "fastround/common/convert.h"
#include "fastround/common/half.h"
#include "fastround/quant/fp_numerics.h"
#include "fastround/quant/int_opt_rtn.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FR_SIMD_NS avx2
#define FR_SIMD_ISA Isa::Avx2
#define FR_SIMD_TABLE kAvx2
#include "fastround/quant/simd_kernels.inc"
#pragma GCC pop_options
#endif
