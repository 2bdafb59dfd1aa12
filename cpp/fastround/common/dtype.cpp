#include "fastround/common/dtype.h"

#include <array>

namespace fastround {

namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  int bits;
};

constexpr std::array<DTypeInfo, 20> kDTypes = {{
    {DType::BOOL, "BOOL", 8},       {DType::F4, "F4", 4},           {DType::F6_E2M3, "F6_E2M3", 6},
    {DType::F6_E3M2, "F6_E3M2", 6}, {DType::U8, "U8", 8},           {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8}, {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E8M0, "F8_E8M0", 8},
    {DType::I16, "I16", 16},        {DType::U16, "U16", 16},        {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::I32, "I32", 32},        {DType::U32, "U32", 32},
    {DType::F32, "F32", 32},        {DType::C64, "C64", 64},        {DType::F64, "F64", 64},
    {DType::I64, "I64", 64},        {DType::U64, "U64", 64},
}};

}  // namespace

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& info : kDTypes)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}

std::string_view dtype_name(DType dt) { return kDTypes[static_cast<size_t>(dt)].name; }

int dtype_bits(DType dt) { return kDTypes[static_cast<size_t>(dt)].bits; }

int dtype_rank(DType dt) { return static_cast<int>(dt); }

bool dtype_is_float_weight(DType dt) { return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16; }

}  // namespace fastround
