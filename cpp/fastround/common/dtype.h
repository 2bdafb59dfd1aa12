// safetensors element types, their sizes and the order safetensors' writer sorts them in.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace fastround {

// Declaration order is safetensors' Dtype enum order; the writer sorts tensors by it, descending.
enum class DType : uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

std::optional<DType> dtype_from_name(std::string_view name);
std::string_view dtype_name(DType dt);
// Size in bits of one element (F4 is 4, F6 is 6); byte sizes are derived from it.
int dtype_bits(DType dt);
int dtype_rank(DType dt);
bool dtype_is_float_weight(DType dt);  // F32, F16, BF16: what the INT kernels accept

}  // namespace fastround
