#include "fastround/source/dequant.h"

#include <algorithm>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/fp_codes.h"
#include "fastround/common/half.h"
#include "fastround/common/parallel.h"

namespace fastround {

namespace {

bool byte_e8m0(const Fp8ScaleView& s) { return s.dtype == DType::F8_E8M0 || (s.dtype == DType::U8 && s.e8m0); }

// Runs inside the parallel loop: the dtype was checked by index_for before it started.
float scale_at(const Fp8ScaleView& s, int64_t i) {
  if (byte_e8m0(s)) return e8m0_to_float(static_cast<const uint8_t*>(s.data)[i]);
  return element_as_float(s.dtype, s.data, i);
}

// Upstream multiplies a bf16 weight by a bf16 scale in bf16: both operands rounded, product rounded.
inline uint16_t bf16_mul(float w, float scale_bf16) { return float_to_bf16(w * scale_bf16); }

// Maps each (row, col) to its scale index; validates coverage once.
struct ScaleIndex {
  int64_t br = 0, bc = 0, stride = 0;
  enum { Block, Scalar, PerRow, PerCol, Elementwise } mode = Scalar;
  int64_t at(int64_t r, int64_t c) const {
    switch (mode) {
      case Block: return (r / br) * stride + c / bc;
      case Scalar: return 0;
      case PerRow: return r;
      case PerCol: return c;
      case Elementwise: return r * stride + c;
    }
    return 0;
  }
};

// Checks the scale's dtype and that it covers the weight; `site` names the weight (and its file).
ScaleIndex index_for(int64_t rows, int64_t cols, const Fp8ScaleView& s, const std::string& site) {
  ScaleIndex ix;
  const bool float_scale = s.dtype == DType::F32 || s.dtype == DType::BF16 || s.dtype == DType::F16;
  if (!float_scale && !byte_e8m0(s))
    throw CheckpointError(site + ": weight_scale_inv has dtype " + std::string(dtype_name(s.dtype)) +
                          "; an FP8 scale is F32, BF16 or F16 (or F8_E8M0, or U8 with scale_fmt ue8m0)");
  if (s.block_rows < 0 || s.block_cols < 0)
    throw CheckpointError(site + ": the config's quantization_config.weight_block_size is not two positive integers");
  if (s.block_rows > 0 && s.block_cols > 0) {
    const int64_t need_r = (rows + s.block_rows - 1) / s.block_rows, need_c = (cols + s.block_cols - 1) / s.block_cols;
    if (s.rows == 0)
      throw CheckpointError(site + ": weight_scale_inv with " + std::to_string(s.numel) +
                            " elements is not a 2-D grid of " + std::to_string(s.block_rows) + "x" +
                            std::to_string(s.block_cols) + " blocks (weight_block_size); needs [" +
                            std::to_string(need_r) + ", " + std::to_string(need_c) + "]");
    if (s.rows < need_r || s.cols < need_c)
      throw CheckpointError(site + " [" + std::to_string(rows) + ", " + std::to_string(cols) + "]: weight_scale_inv [" +
                            std::to_string(s.rows) + ", " + std::to_string(s.cols) + "] does not cover blocks of " +
                            std::to_string(s.block_rows) + "x" + std::to_string(s.block_cols) + " (needs at least [" +
                            std::to_string(need_r) + ", " + std::to_string(need_c) + "])");
    ix.mode = ScaleIndex::Block;
    ix.br = s.block_rows;
    ix.bc = s.block_cols;
    ix.stride = s.cols;
    return ix;
  }
  if (s.numel == 1) return ix;
  if (s.numel == rows * cols && rows > 1 && cols > 1) {  // same shape as the weight
    ix.mode = ScaleIndex::Elementwise;
    ix.stride = cols;
    return ix;
  }
  if (s.numel == rows) {
    ix.mode = ScaleIndex::PerRow;
    return ix;
  }
  if (s.numel == cols) {
    ix.mode = ScaleIndex::PerCol;
    return ix;
  }
  throw CheckpointError(site + " [" + std::to_string(rows) + ", " + std::to_string(cols) + "]: weight_scale_inv with " +
                        std::to_string(s.numel) +
                        " elements is neither a scalar, per-row nor per-column scale, and the config gives no "
                        "weight_block_size");
}

std::string weight_site(const std::string& tensor) { return "[dequant_fp8] tensor '" + tensor + "'"; }

}  // namespace

void check_fp8_scale(int64_t rows, int64_t cols, const Fp8ScaleView& s, const std::string& site) {
  index_for(rows, cols, s, site);
}

void dequant_fp8_scaled_ref(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s,
                            const std::string& tensor, uint16_t* out) {
  const ScaleIndex ix = index_for(rows, cols, s, weight_site(tensor));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float scale = bf16_to_float(float_to_bf16(scale_at(s, ix.at(r, c))));
      out[r * cols + c] = bf16_mul(fp8_e4m3_to_float(w[r * cols + c]), scale);
    }
}

void dequant_fp8_scaled(const uint8_t* w, int64_t rows, int64_t cols, const Fp8ScaleView& s, const std::string& tensor,
                        uint16_t* out) {
  const ScaleIndex ix = index_for(rows, cols, s, weight_site(tensor));
  // Every FP8 byte decodes exactly; a 256-entry table replaces the bit twiddling.
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = fp8_e4m3_to_float(static_cast<uint8_t>(b));
  parallel_for(rows, [&](int64_t r) {
    const uint8_t* wr = w + r * cols;
    uint16_t* o = out + r * cols;
    if (ix.mode == ScaleIndex::Block) {
      for (int64_t c0 = 0; c0 < cols; c0 += ix.bc) {
        const float scale = bf16_to_float(float_to_bf16(scale_at(s, ix.at(r, c0))));
        const int64_t c1 = std::min(cols, c0 + ix.bc);
        for (int64_t c = c0; c < c1; ++c) o[c] = bf16_mul(lut[wr[c]], scale);
      }
    } else {
      for (int64_t c = 0; c < cols; ++c)
        o[c] = bf16_mul(lut[wr[c]], bf16_to_float(float_to_bf16(scale_at(s, ix.at(r, c)))));
    }
  });
}

void dequant_mxfp_source(int bits, const uint8_t* w, const uint8_t* scale, int64_t rows, int64_t cols, uint16_t* out) {
  if ((bits != 4 && bits != 8) || cols % 32 != 0)
    throw OptionError("[dequant_mxfp] bits " + std::to_string(bits) + " and in_features " + std::to_string(cols) +
                      ": MX sources are 4 or 8 bits with whole groups of 32");
  const int64_t groups = cols / 32;
  parallel_for(rows, [&](int64_t r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = bf16_to_float(float_to_bf16(e8m0_to_float(scale[r * groups + g])));
      for (int64_t k = 0; k < 32; ++k) {
        const int64_t c = g * 32 + k;
        float v;
        if (bits == 8) {
          v = fp8_e4m3_to_float(w[r * cols + c]);
        } else {
          const uint8_t byte = w[r * (cols / 2) + c / 2];
          v = e2m1_to_float((c & 1) ? (byte >> 4) : (byte & 0xF));
        }
        out[r * cols + c] = float_to_bf16(v * s);
      }
    }
  });
}

void dequant_nvfp4_source(const uint8_t* packed, const float* scale, int64_t rows, int64_t cols, int64_t group,
                          bool has_global, float global_mult, uint16_t* out) {
  if (group <= 0 || cols % group != 0 || cols % 2 != 0)
    throw OptionError("[dequant_nvfp4] in_features " + std::to_string(cols) + " is not a multiple of the group " +
                      std::to_string(group));
  const int64_t groups = cols / group;
  parallel_for(rows, [&](int64_t r) {
    const uint8_t* pr = packed + r * (cols / 2);
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = pr[c / 2];
      float v = e2m1_to_float((c & 1) ? (byte >> 4) : (byte & 0xF)) * scale[r * groups + c / group];
      if (has_global) v = v * global_mult;
      out[r * cols + c] = float_to_bf16(v);
    }
  });
}

void dequant_int4_source(const Int4SourceView& v, uint16_t* out) {
  if (v.group <= 0 || v.cols % v.group != 0 || v.cols % (v.words32 ? 8 : 2) != 0)
    throw OptionError("[dequant_int4] in_features " + std::to_string(v.cols) + " is not a multiple of the group " +
                      std::to_string(v.group));
  const int64_t groups = v.cols / v.group;
  const int64_t row_bytes = v.cols / 2;  // two nibbles a byte, whether stored as bytes or int32 words
  parallel_for(v.rows, [&](int64_t r) {
    const void* row = static_cast<const uint8_t*>(v.packed) + r * row_bytes;
    for (int64_t c = 0; c < v.cols; ++c) {
      const int64_t g = c / v.group;
      const int zero = !v.zero ? 8 : v.zero_per_element ? v.zero[r * v.cols + c] : v.zero[r * groups + g];
      const int q = int4_nibble(row, v.words32, c) - zero;
      out[r * v.cols + c] = float_to_bf16(static_cast<float>(q) * v.scale[r * groups + g]);
    }
  });
}

void expand_e8m0_block_scale(const uint8_t* scale, int64_t srows, int64_t scols, int64_t rows, int64_t cols,
                             const std::string& site, uint8_t* out) {
  const int64_t trows = rows, tcols = cols / 32;
  int64_t rrep = 0, crep = 0;
  if (srows > 0 && scols > 0 && trows % srows == 0 && tcols % scols == 0) {
    rrep = trows / srows;
    crep = tcols / scols;
  } else if (srows == (rows + 127) / 128 && scols == (cols + 127) / 128) {
    rrep = 128;
    crep = 4;  // 128-column blocks hold four 32-column groups
  } else {
    throw CheckpointError(site + ": E8M0 block scale has shape [" + std::to_string(srows) + ", " +
                          std::to_string(scols) + "], which expands to neither [" + std::to_string(trows) + ", " +
                          std::to_string(tcols) + "] nor from 128x128 blocks");
  }
  for (int64_t r = 0; r < trows; ++r)
    for (int64_t c = 0; c < tcols; ++c) out[r * tcols + c] = scale[(r / rrep) * scols + c / crep];
}

}  // namespace fastround
