// Vector kernels, one table per instruction set, picked at run time through common/cpu.h. Each entry gives
// bytes identical to the scalar code it replaces; a group the vector code cannot prove exact (non-finite
// values, the rare inputs where a step needs libm) falls back to the scalar numerics of fp_numerics.h.
#pragma once

#include <cstdint>

#include "fastround/common/cpu.h"
#include "fastround/common/dtype.h"
#include "fastround/quant/int_rtn.h"

namespace fastround::simd {

struct Kernels {
  Isa isa;
  // out[i] = float(w[offset + i]) for i < n; F32, F16 or BF16 (as convert.h's load_as_float).
  void (*load_as_float)(DType src, const void* w, int64_t offset, int64_t n, float* out);
  // One INT RTN group of n values: its fp16 scale bits and zero point (int_group_quant of min(0, x...) and
  // max(0, x...)), and words[k * stride] = the auto_gptq word of codes clamp(rne(x / scale) + zero, 0, maxq)
  // of x[k*pf, (k+1)*pf); n a multiple of 8 and of pf = 32 / bits.
  void (*int_group)(const float* x, int64_t n, int bits, bool sym, uint16_t* scale_fp16, int32_t* zero,
                    uint32_t* words, int64_t stride);
  // One MX row: codes [cols] (one byte per element) and scale bytes [cols/32].
  void (*mx_row)(int bits, const float* x, int64_t cols, DType src, bool opt_rtn, uint8_t* codes, uint8_t* scale);
  // One NVFP4_E5M3 16-group (scale searched when opt_rtn): its scale byte and 8 packed E2M1 bytes ...
  void (*nv_group)(const float* x, bool opt_rtn, uint8_t* scale, uint8_t* packed);
  // ... or its quantize-dequantized values q[16] (the fake format, before the cast to the source dtype).
  void (*nv_fake_group)(const float* x, bool opt_rtn, float* q);
  // OPT-RTN loss of one candidate (int_opt_rtn.cpp's loss_elements summed by torch_sum_f32) for a finite iscale,
  // a nonzero finite scale and finite x / w (w null: weight 1); scratch holds n floats.
  float (*int_search_loss)(const float* x, const float* w, int64_t n, DType dt, float iscale, float scale, float nmax,
                           float* scratch);
};

// nullptr for Isa::Scalar (or an ISA this build has no kernels for).
const Kernels* kernels_for(Isa isa);
// kernels_for(active_isa()); call outside parallel regions (reading FASTROUND_ISA may throw).
const Kernels* active_kernels();

extern const Kernels kAvx2;
extern const Kernels kAvx512;

}  // namespace fastround::simd
