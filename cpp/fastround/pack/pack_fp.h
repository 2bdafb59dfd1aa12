// Packing of small-float codes: E2M1 (MXFP4, NVFP4) two per byte.
#pragma once

#include <cstdint>

namespace fastround {

// out [n/2] u8 from 4-bit codes [n]: element 2k in the low nibble (compressed-tensors' weight_packed). n even.
void pack_e2m1_ref(const uint8_t* codes, int64_t n, uint8_t* out);
void pack_e2m1(const uint8_t* codes, int64_t n, uint8_t* out);
void unpack_e2m1_ref(const uint8_t* packed, int64_t n, uint8_t* codes);

}  // namespace fastround
