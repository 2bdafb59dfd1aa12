// Source-dtype <-> fp32 conversion of contiguous runs; the kernels' only dtype branch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "fastround/common/dtype.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"

namespace fastround {

// Kernel entry guard: load_as_float's dtypes, checked before a kernel's parallel loop starts.
inline void require_float_source(DType src, const char* site) {
  if (!dtype_is_float_weight(src))
    throw OptionError(std::string("[") + site + "] unsupported source dtype " + std::string(dtype_name(src)) +
                      "; expected F32, F16 or BF16");
}

// out[i] = float(w[offset + i]) for i < n; w holds F32, F16 or BF16 elements.
inline void load_as_float(DType src, const void* w, int64_t offset, int64_t n, float* __restrict out) {
  switch (src) {
    case DType::F32: {
      const float* p = static_cast<const float*>(w) + offset;
      std::copy(p, p + n, out);
      break;
    }
    case DType::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(w) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bits_float(static_cast<uint32_t>(p[i]) << 16);
      break;
    }
    case DType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(w) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
      break;
    }
    default: throw OptionError("[convert] unsupported source dtype " + std::string(dtype_name(src)));
  }
}

// The dtypes element_as_float reads; the planner checks scales against it before any kernel runs.
inline bool element_readable_as_float(DType dt) {
  switch (dt) {
    case DType::F32: case DType::F64: case DType::BF16: case DType::F16: case DType::F8_E4M3:
    case DType::U8: case DType::I8: case DType::I16: case DType::I32: return true;
    default: return false;
  }
}

// Element i of a small tensor (a scale, a zero point) as torch's .to(float32) reads it.
inline float element_as_float(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F8_E4M3: return fp8_e4m3_to_float(static_cast<const uint8_t*>(p)[i]);
    case DType::U8: return static_cast<const uint8_t*>(p)[i];
    case DType::I8: return static_cast<const int8_t*>(p)[i];
    case DType::I16: return static_cast<const int16_t*>(p)[i];
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    default: throw OptionError("[convert] cannot read a " + std::string(dtype_name(dt)) + " element as a number");
  }
}

// ... and as .to(int16): floats truncate toward zero, wider integers keep their low 16 bits.
inline int16_t element_as_int16(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::U8: return static_cast<const uint8_t*>(p)[i];
    case DType::I8: return static_cast<const int8_t*>(p)[i];
    case DType::I16: return static_cast<const int16_t*>(p)[i];
    case DType::I32: return static_cast<int16_t>(static_cast<const int32_t*>(p)[i]);
    case DType::I64: return static_cast<int16_t>(static_cast<const int64_t*>(p)[i]);
    default: return static_cast<int16_t>(element_as_float(dt, p, i));
  }
}

// Rounds fp32 to the source dtype (RNE, as torch's .to()) and back: what a value looks like once stored.
inline float round_to_dtype(DType dt, float v) {
  switch (dt) {
    case DType::BF16: return bf16_to_float(float_to_bf16(v));
    case DType::F16: return fp16_to_float(float_to_fp16(v));
    default: return v;
  }
}

// dst[offset + i] = dtype(v[i]) for i < n.
inline void store_from_float(DType dst_dtype, const float* v, int64_t n, void* dst, int64_t offset) {
  switch (dst_dtype) {
    case DType::F32: std::copy(v, v + n, static_cast<float*>(dst) + offset); break;
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(v[i]);
      break;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_fp16(v[i]);
      break;
    }
    default: throw OptionError("[convert] unsupported destination dtype " + std::string(dtype_name(dst_dtype)));
  }
}

}  // namespace fastround
