// Reading packed INT weights as the checkpoints store them, for inference: the GPTQ words of auto_gptq /
// auto_round (zero points stored minus one, "gptq"), gptqmodel's v2 words (zero points as is, "gptq_v2") and the
// AWQ GEMM words (auto_awq, auto_round:auto_awq). The bytes are those pack/pack_gptq.h and pack/pack_awq.h write.
#pragma once

#include <cstdint>
#include <string>

#include "fastround/common/dtype.h"
#include "fastround/common/half.h"
#include "fastround/pack/pack_awq.h"

namespace fastround::infer {

enum class WoqLayout { Gptq = 0, GptqV2 = 1, Awq = 2 };

// Outputs per tile of a tiled GPTQ qweight (woq_tile_qweight): one AVX-512 GEMV block, so a block's words of a
// group (16 rows of 256 bytes at 4 bits) are one contiguous 4 KiB run instead of 16 rows a whole row apart.
inline constexpr int64_t kWoqTile = 64;

// "gptq", "gptq_v2" or "awq", and "gptq_tiled" / "gptq_v2_tiled" (their words in tiles, woq_tile_qweight) where
// `tiled` is given (it is set to whether the suffix was there); anything else throws OptionError naming `site`.
WoqLayout parse_woq_layout(const std::string& name, const char* site, bool* tiled = nullptr);
const char* woq_layout_name(WoqLayout layout);

// One packed linear layer. in/out are the layer's features; the GPTQ qweight may carry padded inputs (whole
// words, whole groups) and the qzeros padded outputs (whole words), which the kernels never read as real data.
//   gptq, gptq_v2: qweight [in_p/pf, out] int32, input k in lane k%pf of row k/pf (lane 0 = low bits);
//                  tiled (tile > 0): the same tensor shape, word (row r, output o) at flat index
//                  ((o / tile) * in_p/pf + r) * tile + o % tile: each tile's rows back to back
//                  qzeros  [groups, ceil(out/pf)] int32, output o in lane o%pf of word o/pf
//   awq (4 bits):  qweight [in, out/8] int32, output 8w+p in nibble kAwqOrder[p] of word w
//                  qzeros  [groups, out/8] int32, same interleave
//   scales [groups, out] fp16, bf16 or fp32; input k belongs to group k / group.
struct WoqWeightView {
  WoqLayout layout = WoqLayout::Gptq;
  int bits = 4;
  int64_t in = 0, out = 0;
  int64_t group = 0;   // inputs per group (per channel: in)
  int64_t groups = 0;  // ceil(in / group)
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const void* scales = nullptr;
  DType scale_dtype = DType::F16;
  int64_t tile = 0;    // GPTQ only: 0 (rows of out words) or kWoqTile (see above)
  int64_t qrows = 0;   // qweight's stored rows (padded inputs included); set by woq_resolve

  int pack_factor() const { return 32 / bits; }
  int zero_offset() const { return layout == WoqLayout::Gptq ? 1 : 0; }
  // Rows of qweight the kernels may read: GPTQ reads whole words of inputs (padded inputs hold codes times a
  // zero activation), AWQ one row per input.
  int64_t qweight_rows() const { return layout == WoqLayout::Awq ? in : (in + pack_factor() - 1) / pack_factor(); }
  int64_t qweight_cols() const { return layout == WoqLayout::Awq ? out / pack_factor() : out; }
  int64_t qzeros_cols() const { return (out + pack_factor() - 1) / pack_factor(); }
  // GPTQ: the word of row r, output o; the words of outputs o.. up to the end of o's tile follow it, and the same
  // outputs of row r + 1 start qrow_stride() words further.
  const int32_t* qrow(int64_t r, int64_t o) const {
    return tile ? qweight + ((o / tile) * qrows + r) * tile + o % tile : qweight + r * out + o;
  }
  int64_t qrow_stride() const { return tile ? tile : out; }
};

// GPTQ words [rows, out] (rows of out words) to the tiled order of the same size (out a multiple of kWoqTile), and
// back: a permutation, so a layer repacked once at load keeps its memory size.
void woq_tile_qweight(const int32_t* src, int64_t rows, int64_t out, int32_t* dst);
void woq_untile_qweight(const int32_t* src, int64_t rows, int64_t out, int32_t* dst);

// The expected shapes of one layer's tensors, checked against what the caller has. Every mismatch throws
// OptionError "[site] <tensor>: expected ..., got ...". qweight_rows may exceed the view's (padded inputs).
struct WoqShapes {
  int64_t qweight[2], qzeros[2], scales[2];
};

// Fills view.in/out/group/groups from the tensors' shapes and checks them: bits (2, 4, 8; AWQ 4 only), group_size
// (-1 or a positive count; groups = ceil(in / group_size)), the three shapes and the scales' dtype.
void woq_resolve(WoqWeightView& view, int64_t in, int64_t group_size, const int64_t qweight_shape[2],
                 const int64_t qzeros_shape[2], const int64_t scales_shape[2], const char* site);

// Unsigned code of input k, output o (GPTQ: k may be a padded input).
inline uint32_t woq_code(const WoqWeightView& w, int64_t k, int64_t o) {
  const uint32_t mask = (1u << w.bits) - 1u;
  const int pf = w.pack_factor();
  if (w.layout == WoqLayout::Awq) {
    const uint32_t word = static_cast<uint32_t>(w.qweight[k * (w.out / pf) + o / pf]);
    return (word >> (w.bits * kAwqOrder[o % pf])) & mask;
  }
  const uint32_t word = static_cast<uint32_t>(*w.qrow(k / pf, o));
  return (word >> (w.bits * (k % pf))) & mask;
}

// Zero point of group g, output o, with the layout's offset added back.
inline int32_t woq_zero(const WoqWeightView& w, int64_t g, int64_t o) {
  const uint32_t mask = (1u << w.bits) - 1u;
  const int pf = w.pack_factor();
  const uint32_t word = static_cast<uint32_t>(w.qzeros[g * w.qzeros_cols() + o / pf]);
  const int slot = w.layout == WoqLayout::Awq ? kAwqOrder[o % pf] : static_cast<int>(o % pf);
  return static_cast<int32_t>((word >> (w.bits * slot)) & mask) + w.zero_offset();
}

inline float woq_scale(const WoqWeightView& w, int64_t g, int64_t o) {
  const int64_t i = g * w.out + o;
  switch (w.scale_dtype) {
    case DType::F32: return static_cast<const float*>(w.scales)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(w.scales)[i]);
    default: return fp16_to_float(static_cast<const uint16_t*>(w.scales)[i]);
  }
}

// The dequantized weight of input k, output o: (code - zero) * scale in fp32, as the auto_gptq / AWQ kernels
// and auto_round's QuantLinear reference define it.
inline float woq_weight(const WoqWeightView& w, int64_t k, int64_t o) {
  const int64_t g = k / w.group;
  return (static_cast<float>(woq_code(w, k, o)) - static_cast<float>(woq_zero(w, g, o))) * woq_scale(w, g, o);
}

}  // namespace fastround::infer
