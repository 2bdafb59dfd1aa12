// The weight-encoding table, in the spirit of ggml's type_traits: one row per way a quantized weight is
// stored, holding its group rule, the tensors it writes, its kernels (fast and reference), its packer and
// the export formats that take it. Everything that dispatches on an encoding asks this table; adding an
// encoding is one row plus its kernels.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fastround/common/dtype.h"
#include "fastround/quant/scheme.h"

namespace fastround {

enum class Encoding : uint8_t { IntGptq, IntAwq, Mxfp4, Mxfp8, Nvfp4E5M3 };

// A weight as the kernels read it: [rows=out, cols=in] row-major, F32, F16 or BF16.
struct WeightView {
  DType dtype = DType::BF16;
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
};

// The per-layer settings a kernel needs; the rest of the scheme (act_*, formats) is not its business.
struct EncodingParams {
  int bits = 4;
  int64_t group_size = 128;  // INT: > 0, or -1 for one group per output row; FP rows use their own group
  bool sym = true;
  bool opt_rtn = true;       // MXFP / NVFP4: search the scale (upstream's default unless disable_opt_rtn);
                             // INT sym, `encode` only: OPT-RTN (model-free INT is always plain RTN)
  const float* imatrix = nullptr;  // [cols] OPT-RTN loss weights (the regular flow's imatrix); null: all 1
  bool pad_partial_groups = true;  // INT GPTQ: false gives the regular flow's unpadded shapes (int_gptq_specs)
  int zero_offset = -1;            // INT GPTQ: qzeros hold clamp(zp - zero_offset); -1: the row's (sym 1, asym 0)
  // Pack as upstream's regular flow, whose packer re-derives each code from the qdq weight (value / scale):
  // NVFP4 zeros lose their sign (torch.sign(-0) is 0) and a zero-scale group packs as 0 (0/0). Other rows: no-op.
  bool from_qdq = false;
};

// One output tensor of an encoded layer, named <layer>.<suffix>.
struct TensorSpec {
  std::string suffix;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t nbytes() const;
};

// The unpacked form every producer (RTN, OPT-RTN, SignRound) hands to the packer.
//   INT:   codes [rows, cols] in [0, 2^bits); scales fp16 bits [rows, groups]; zeros int32 [rows, groups]
//   MXFP:  codes [rows, cols] E2M1 nibbles (bits 4) or E4M3 bytes (bits 8); scales E8M0 [rows, cols/32]
//   NVFP4: codes [rows, cols] E2M1 nibbles; scales UE5M3 [rows, cols/16]; zeros unused
// INT groups follow upstream's grouping (codes.h IntGrouping): in_features below group_size is one group. After
// OPT-RTN the INT scales are in the weight's dtype (scale_dtype): upstream keeps them unrounded until packing.
struct CodesView {
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;
  const void* scales = nullptr;
  const int32_t* zeros = nullptr;
  DType scale_dtype = DType::F16;  // INT: F16, BF16 or F32; FP rows: U8
};
struct CodesBuffers {
  std::vector<uint8_t> codes, scales;
  std::vector<int32_t> zeros;
  DType scale_dtype = DType::F16;
  CodesView view(int64_t rows, int64_t cols) const {
    return {rows, cols, codes.data(), scales.data(), zeros.data(), scale_dtype};
  }
};

// Kernels share these signatures; `outs` / `ins` follow the order of the row's `layout`.
using LayoutFn = std::vector<TensorSpec> (*)(int64_t rows, int64_t cols, const EncodingParams& p, DType src);
using QuantizeFn = void (*)(const WeightView& w, const EncodingParams& p, void* const* outs);
using EncodeFn = void (*)(const WeightView& w, const EncodingParams& p, CodesBuffers& out);
using PackFn = void (*)(const CodesView& c, const EncodingParams& p, void* const* outs);
using DequantizeFn = void (*)(const void* const* ins, int64_t rows, int64_t cols, const EncodingParams& p, float* out);
using FakeQuantizeFn = void (*)(const WeightView& w, const EncodingParams& p, void* out);  // qdq, source dtype
// codes -> the quantize-dequantized weight [rows, cols] in `out` (F32, F16, BF16), as the regular flow leaves it.
// `source`: the weight the codes came from, or null; INT sym zeros take its sign as upstream's qdq does.
using DequantizeCodesFn = void (*)(const CodesView& c, const EncodingParams& p, const WeightView* source, DType out,
                                   void* dst);

struct EncodingTraits {
  Encoding id;
  std::string_view name;        // "int_gptq", "int_awq", "mxfp4", "mxfp8", "nvfp4_e5m3"
  std::string_view data_type;   // upstream's data_type family of the schemes it serves
  bool (*supports_bits)(int bits);
  int64_t fixed_group;          // 0: the scheme's group_size; else the only group the format has
  bool pads_partial_groups;     // in_features may be padded to whole groups (INT); else such a layer is kept
  // quantization_config.packing_format of a sym / asym layer in format auto_round.
  std::string_view packing_format_sym, packing_format_asym;
  int zero_offset_sym, zero_offset_asym;  // subtracted from zero points before packing (GPTQ stores zp-1)
  std::vector<std::string_view> model_free_formats;  // first-format names model-free accepts for it
  std::vector<std::string_view> routed_formats;      // formats whose RTN requests upstream routes to model-free
  LayoutFn layout;              // output tensors; throws OptionError when the shape cannot be encoded
  QuantizeFn quantize, quantize_ref;  // weight -> packed outputs (fused fast path; scalar reference)
  EncodeFn encode_ref;          // weight -> unpacked codes, the reference producer: pack_ref of them == quantize_ref
  // weight -> unpacked codes as upstream's regular flow computes them (fast, parallel): INT in the weight's own
  // dtype (codes.h), with OPT-RTN for sym when p.opt_rtn (int_opt_rtn.h); FP rows as quantize, except MXFP OPT-RTN
  // with an imatrix (fp_opt_rtn.h).
  EncodeFn encode;
  PackFn pack, pack_ref;        // codes from any producer -> packed outputs
  DequantizeFn dequantize_ref;  // packed outputs -> float [rows, cols]
  FakeQuantizeFn fake_quantize; // format "fake": qdq weight in the source dtype; null where none exists
  DequantizeCodesFn dequantize_codes;

  int zero_offset(bool sym) const { return sym ? zero_offset_sym : zero_offset_asym; }
  std::string_view packing_format(bool sym) const { return sym ? packing_format_sym : packing_format_asym; }
  // Whether in_features fills whole groups (INT per channel: whole packed words).
  bool full_groups(int64_t cols, const EncodingParams& p) const;
  bool accepts_model_free_format(std::string_view fmt) const;
};

const std::vector<EncodingTraits>& encodings();
const EncodingTraits& encoding(Encoding id);

// The encoding an effective per-layer scheme is written in under `format` (first format of a list), or
// nullptr when the layer stays in full precision. Throws OptionError when no row serves its data_type and bits.
const EncodingTraits* encoding_for(const SchemeFields& effective, std::string_view format = "auto_round");

// The kernel parameters of an effective scheme for `enc`.
EncodingParams encoding_params(const EncodingTraits& enc, const SchemeFields& effective, bool opt_rtn);

}  // namespace fastround
