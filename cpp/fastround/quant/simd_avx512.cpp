// The avx512 kernel table: simd_kernels.inc compiled for avx512 (see there for why headers come first).
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
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define FR_SIMD_NS avx512
#define FR_SIMD_ISA Isa::Avx512
#define FR_SIMD_TABLE kAvx512
#include "fastround/quant/simd_kernels.inc"
#pragma GCC pop_options
#endif
