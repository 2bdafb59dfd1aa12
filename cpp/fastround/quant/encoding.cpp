#include "fastround/quant/encoding.h"

#include <algorithm>
#include <cstring>

#include "fastround/common/convert.h"
#include "fastround/common/error.h"
#include "fastround/common/half.h"
#include "fastround/pack/pack_awq.h"
#include "fastround/pack/pack_fp.h"
#include "fastround/pack/pack_gptq.h"
#include "fastround/quant/codes.h"
#include "fastround/quant/fp_opt_rtn.h"
#include "fastround/quant/fp_rtn.h"
#include "fastround/quant/int_opt_rtn.h"
#include "fastround/quant/int_rtn.h"

namespace fastround {

namespace {

template <typename T>
T* out_as(void* const* outs, int i) {
  return static_cast<T*>(outs[i]);
}
template <typename T>
const T* in_as(const void* const* ins, int i) {
  return static_cast<const T*>(ins[i]);
}

// ---- INT, RTN codes (shared by the GPTQ and AWQ rows) ----

IntQuantParams int_params(const EncodingParams& p, int zero_offset) { return {p.bits, p.group_size, p.sym, zero_offset}; }

// Reference RTN codes in the producer layout: codes [rows, cols], scales [rows, groups], zeros [rows, groups].
void encode_int_rtn_ref(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  const IntGptqLayout L = int_gptq_layout(w.rows, w.cols, int_params(p, 0), "weight");
  std::vector<uint8_t> codes(static_cast<size_t>(L.rows * L.cols_p));    // [rows, cols_p]
  std::vector<int32_t> zeros(static_cast<size_t>(L.rows_p * L.groups));  // [rows_p, groups]
  std::vector<uint16_t> scales(static_cast<size_t>(L.groups * L.rows));  // [groups, rows]
  quantize_int_rtn_ref(w.dtype, w.data, L, int_params(p, 0), codes.data(), zeros.data(), scales.data());
  out.codes.resize(static_cast<size_t>(w.rows * w.cols));
  out.scales.resize(static_cast<size_t>(w.rows * L.groups * 2));
  out.zeros.resize(static_cast<size_t>(w.rows * L.groups));
  uint16_t* s = reinterpret_cast<uint16_t*>(out.scales.data());
  for (int64_t r = 0; r < w.rows; ++r) {
    std::copy_n(&codes[r * L.cols_p], w.cols, &out.codes[r * w.cols]);
    for (int64_t g = 0; g < L.groups; ++g) {
      s[r * L.groups + g] = scales[g * L.rows + r];
      out.zeros[r * L.groups + g] = zeros[r * L.groups + g];
    }
  }
}

// Packed INT scales are fp16: OPT-RTN's weight-dtype scales round to it here, as upstream's packer (.half()) does.
const uint16_t* fp16_scales(const CodesView& c, int64_t n, std::vector<uint16_t>& tmp) {
  if (c.scale_dtype == DType::F16) return static_cast<const uint16_t*>(c.scales);
  if (c.scale_dtype != DType::BF16 && c.scale_dtype != DType::F32)
    throw OptionError("[int] scales: dtype must be F16, BF16 or F32, got " + std::string(dtype_name(c.scale_dtype)));
  tmp.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tmp[i] = float_to_fp16(element_as_float(c.scale_dtype, c.scales, i));
  return tmp.data();
}

IntCodesView int_codes_view(const CodesView& c, const EncodingParams& p, int64_t group, std::vector<uint16_t>& tmp) {
  IntCodesView v;
  v.rows = c.rows;
  v.cols = c.cols;
  v.bits = p.bits;
  v.group = group;
  v.codes = c.codes;
  v.scales = fp16_scales(c, c.rows * v.groups(), tmp);
  v.zeros = c.zeros;
  v.pad_zero = int_group_quant(0.0f, 0.0f, p.bits, p.sym).zero;
  return v;
}

// The regular flow's producer: RTN in the weight's own dtype, or OPT-RTN (sym) with scales in that dtype.
void int_encode(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  const IntGrouping g = int_grouping(w.rows, w.cols, p.group_size, "weight");
  const size_t ng = static_cast<size_t>(g.rows * g.groups);
  out.codes.resize(static_cast<size_t>(w.rows * w.cols));
  out.zeros.resize(ng);
  if (p.opt_rtn && p.sym) {
    out.scale_dtype = w.dtype;
    out.scales.resize(ng * static_cast<size_t>(dtype_bits(w.dtype) / 8));
    int_opt_rtn(w.dtype, w.data, g, p.bits, p.imatrix, out.codes.data(), out.scales.data());
    std::fill(out.zeros.begin(), out.zeros.end(), int32_t{1} << (p.bits - 1));
  } else {
    out.scale_dtype = DType::F16;
    out.scales.resize(ng * 2);
    int_rtn_codes(w.dtype, w.data, g, p.bits, p.sym, out.codes.data(), reinterpret_cast<uint16_t*>(out.scales.data()),
                  out.zeros.data());
  }
}

void int_dequantize_codes(const CodesView& c, const EncodingParams& p, const WeightView* source, DType out, void* dst) {
  if (source != nullptr && (source->rows != c.rows || source->cols != c.cols))
    throw OptionError("[int] weight: shape does not match the codes");
  dequantize_int_codes(c.codes, c.scale_dtype, c.scales, c.zeros, int_grouping(c.rows, c.cols, p.group_size, "codes"),
                       out, dst, p.sym, source ? source->dtype : DType::F32, source ? source->data : nullptr);
}

// ---- INT, GPTQ layout ----

constexpr int kGptqZeroOffsetSym = 1;   // sym GPTQ stores zp-1; consumers add 1 back
constexpr int kGptqZeroOffsetAsym = 0;  // asym "auto_round" packing stores zp as is

int gptq_offset(const EncodingParams& p) {
  if (p.zero_offset >= 0) return p.zero_offset;  // auto_gptq stores zp-1 for asym too
  return p.sym ? kGptqZeroOffsetSym : kGptqZeroOffsetAsym;
}

IntGptqLayout gptq_layout(int64_t rows, int64_t cols, const EncodingParams& p) {
  return int_gptq_layout(rows, cols, int_params(p, gptq_offset(p)), "weight");
}

// Upstream's regular flow packs with auto_round_extension's QuantLinear, which pads nothing: qweight
// [cols*bits/32, rows] (its reshape needs cols % 32 == 0), qzeros [groups, (rows/32)*bits] (out_features past the
// last whole 32 get no zero-point lanes), scales [groups, rows]. Each is a prefix of the padded layout.
std::vector<TensorSpec> int_gptq_regular_specs(int64_t rows, int64_t cols, const EncodingParams& p) {
  const IntGptqLayout L = gptq_layout(rows, cols, p);
  if (cols % 32 != 0)
    throw OptionError("[int_gptq] weight: in_features " + std::to_string(cols) +
                      " is not a multiple of 32, which unpadded (regular-flow) GPTQ packing needs");
  return {{"qweight", DType::I32, {cols / L.pack_factor, L.rows}},  // [in/pf, out]
          {"qzeros", DType::I32, {L.groups, rows / 32 * p.bits}},    // [groups, (out/32)*bits]
          {"scales", DType::F16, {L.groups, L.rows}}};               // [groups, out]
}

std::vector<TensorSpec> int_gptq_specs(int64_t rows, int64_t cols, const EncodingParams& p, DType) {
  if (!p.pad_partial_groups) return int_gptq_regular_specs(rows, cols, p);
  const IntGptqLayout L = gptq_layout(rows, cols, p);
  return {{"qweight", DType::I32, {L.cols_p / L.pack_factor, L.rows}},  // [in_p/pf, out]
          {"qzeros", DType::I32, {L.groups, L.rows_p / L.pack_factor}},  // [groups, out_p/pf]
          {"scales", DType::F16, {L.groups, L.rows}}};                   // [groups, out]
}

void int_gptq_quantize(const WeightView& w, const EncodingParams& p, void* const* outs) {
  quantize_int_gptq(w.dtype, w.data, gptq_layout(w.rows, w.cols, p), int_params(p, gptq_offset(p)),
                    out_as<int32_t>(outs, 0), out_as<int32_t>(outs, 1), out_as<uint16_t>(outs, 2));
}

void int_gptq_quantize_ref(const WeightView& w, const EncodingParams& p, void* const* outs) {
  quantize_int_gptq_ref(w.dtype, w.data, gptq_layout(w.rows, w.cols, p), int_params(p, gptq_offset(p)),
                        out_as<int32_t>(outs, 0), out_as<int32_t>(outs, 1), out_as<uint16_t>(outs, 2));
}

template <bool Ref>
void int_gptq_pack(const CodesView& c, const EncodingParams& p, void* const* outs) {
  const IntGptqLayout L = gptq_layout(c.rows, c.cols, p);
  std::vector<uint16_t> tmp;
  const IntCodesView v = int_codes_view(c, p, L.group, tmp);
  const auto pack = Ref ? pack_gptq_ref : pack_gptq;
  if (p.pad_partial_groups) {
    pack(v, gptq_offset(p), out_as<int32_t>(outs, 0), out_as<int32_t>(outs, 1), out_as<uint16_t>(outs, 2));
    return;
  }
  // Pack padded, keep the regular layout's prefixes: qweight's first cols/pf word rows, each qzeros row's first words.
  const std::vector<TensorSpec> specs = int_gptq_regular_specs(c.rows, c.cols, p);
  std::vector<int32_t> qweight(static_cast<size_t>(L.qweight_elems())), qzeros(static_cast<size_t>(L.qzeros_elems()));
  pack(v, gptq_offset(p), qweight.data(), qzeros.data(), out_as<uint16_t>(outs, 2));
  std::copy_n(qweight.data(), specs[0].shape[0] * specs[0].shape[1], out_as<int32_t>(outs, 0));
  const int64_t zwords = specs[1].shape[1], zwords_p = L.rows_p / L.pack_factor;
  for (int64_t g = 0; g < L.groups; ++g)
    std::copy_n(qzeros.data() + g * zwords_p, zwords, out_as<int32_t>(outs, 1) + g * zwords);
}

void int_gptq_dequantize_ref(const void* const* ins, int64_t rows, int64_t cols, const EncodingParams& p, float* out) {
  dequantize_int_gptq_ref(in_as<int32_t>(ins, 0), in_as<int32_t>(ins, 1), in_as<uint16_t>(ins, 2),
                          gptq_layout(rows, cols, p), int_params(p, gptq_offset(p)), out);
}

// ---- INT, AWQ GEMM layout (4-bit) ----

int64_t awq_group(int64_t cols, const EncodingParams& p) { return p.group_size == -1 ? cols : p.group_size; }

std::vector<TensorSpec> int_awq_specs(int64_t rows, int64_t cols, const EncodingParams& p, DType) {
  const int64_t g = awq_group(cols, p);
  if (p.bits != 4) throw OptionError("[int_awq] weight: the AWQ layout holds 4-bit codes only, got bits=" + std::to_string(p.bits));
  if (rows <= 0 || cols <= 0) throw OptionError("[int_awq] weight: cannot quantize an empty weight");
  if (g <= 0 || cols % g != 0)
    throw OptionError("[int_awq] weight: in_features " + std::to_string(cols) + " is not a multiple of group_size " +
                      std::to_string(p.group_size));
  if (rows % 8 != 0)
    throw OptionError("[int_awq] weight: out_features " + std::to_string(rows) + " is not a multiple of 8");
  return {{"qweight", DType::I32, {cols, rows / 8}},     // [in, out/8], interleaved along out
          {"qzeros", DType::I32, {cols / g, rows / 8}},  // [groups, out/8]
          {"scales", DType::F16, {cols / g, rows}}};     // [groups, out]
}

template <bool Ref>
void int_awq_pack(const CodesView& c, const EncodingParams& p, void* const* outs) {
  std::vector<uint16_t> tmp;
  const IntCodesView v = int_codes_view(c, p, awq_group(c.cols, p), tmp);
  (Ref ? pack_awq_ref : pack_awq)(v, out_as<int32_t>(outs, 0), out_as<int32_t>(outs, 1), out_as<uint16_t>(outs, 2));
}

template <bool Ref>
void int_awq_quantize(const WeightView& w, const EncodingParams& p, void* const* outs) {
  int_awq_specs(w.rows, w.cols, p, w.dtype);  // shape checks before any work
  CodesBuffers codes;
  encode_int_rtn_ref(w, p, codes);
  int_awq_pack<Ref>(codes.view(w.rows, w.cols), p, outs);
}

void int_awq_dequantize_ref(const void* const* ins, int64_t rows, int64_t cols, const EncodingParams& p, float* out) {
  const int64_t g = awq_group(cols, p), groups = cols / g;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  std::vector<int32_t> zeros(static_cast<size_t>(rows * groups));
  unpack_awq_ref(in_as<int32_t>(ins, 0), in_as<int32_t>(ins, 1), rows, cols, g, codes.data(), zeros.data());
  const uint16_t* scales = in_as<uint16_t>(ins, 2);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      out[r * cols + k] = static_cast<float>(codes[r * cols + k] - zeros[r * groups + k / g]) *
                          fp16_to_float(scales[(k / g) * rows + r]);
}

// ---- MXFP4 / MXFP8 ----

template <int BITS>
std::vector<TensorSpec> mxfp_specs(int64_t rows, int64_t cols, const EncodingParams&, DType) {
  mxfp_layout(rows, cols, BITS, "weight");
  std::vector<TensorSpec> s;
  if (BITS == 4)
    s.push_back({"weight_packed", DType::U8, {rows, cols / 2}});  // E2M1, element 2k in the low nibble
  else
    s.push_back({"weight", DType::F8_E4M3, {rows, cols}});
  s.push_back({"weight_scale", DType::U8, {rows, cols / 32}});  // E8M0
  return s;
}

template <int BITS, bool Ref>
void mxfp_quantize(const WeightView& w, const EncodingParams& p, void* const* outs) {
  const MxfpLayout L = mxfp_layout(w.rows, w.cols, BITS, "weight");
  (Ref ? quantize_mxfp_ref : quantize_mxfp)(w.dtype, w.data, L, p.opt_rtn, out_as<uint8_t>(outs, 0),
                                            out_as<uint8_t>(outs, 1));
}

// Packed small-float outputs (weight bytes, scale bytes) -> one code byte per element plus the scales.
void fp_codes_of(const uint8_t* weight, const uint8_t* scale, int64_t n, int64_t scale_n, bool nibbles,
                 CodesBuffers& out) {
  out.codes.resize(static_cast<size_t>(n));
  if (nibbles)
    unpack_e2m1_ref(weight, n, out.codes.data());
  else
    std::copy_n(weight, n, out.codes.data());
  out.scales.assign(scale, scale + scale_n);
  out.zeros.clear();
  out.scale_dtype = DType::U8;
}

// The regular flow's imatrix-weighted search (fp_opt_rtn.h) writes codes and scales unpacked; true if it ran.
template <bool Ref>
bool mxfp_encode_imatrix(const WeightView& w, const EncodingParams& p, const MxfpLayout& L, CodesBuffers& out) {
  if (!p.opt_rtn || p.imatrix == nullptr) return false;
  out.codes.resize(static_cast<size_t>(w.rows * w.cols));
  out.scales.resize(static_cast<size_t>(L.scale_bytes()));
  out.zeros.clear();
  out.scale_dtype = DType::U8;
  (Ref ? mx_opt_rtn_ref : mx_opt_rtn)(w.dtype, w.data, L, p.imatrix, out.codes.data(), out.scales.data());
  return true;
}

template <int BITS>
void mxfp_encode_ref(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  const MxfpLayout L = mxfp_layout(w.rows, w.cols, BITS, "weight");
  if (mxfp_encode_imatrix<true>(w, p, L, out)) return;
  std::vector<uint8_t> weight(static_cast<size_t>(L.weight_bytes())), scale(static_cast<size_t>(L.scale_bytes()));
  quantize_mxfp_ref(w.dtype, w.data, L, p.opt_rtn, weight.data(), scale.data());
  fp_codes_of(weight.data(), scale.data(), w.rows * w.cols, L.scale_bytes(), BITS == 4, out);
}

// NVFP4_E5M3's search has no imatrix weighting here.
void reject_imatrix(const EncodingParams& p, const char* row) {
  if (p.opt_rtn && p.imatrix != nullptr)
    throw OptionError(std::string("[") + row + "] imatrix: an imatrix-weighted scale search is implemented for INT sym "
                      "and MXFP only; pass imatrix=None or opt_rtn=False");
}

template <int BITS>
void mxfp_encode(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  const MxfpLayout L = mxfp_layout(w.rows, w.cols, BITS, "weight");
  if (mxfp_encode_imatrix<false>(w, p, L, out)) return;
  std::vector<uint8_t> weight(static_cast<size_t>(L.weight_bytes())), scale(static_cast<size_t>(L.scale_bytes()));
  quantize_mxfp(w.dtype, w.data, L, p.opt_rtn, weight.data(), scale.data());
  fp_codes_of(weight.data(), scale.data(), w.rows * w.cols, L.scale_bytes(), BITS == 4, out);
}

template <int BITS>
void mxfp_dequantize_codes(const CodesView& c, const EncodingParams&, const WeightView*, DType out, void* dst) {
  dequantize_mxfp_codes(c.codes, static_cast<const uint8_t*>(c.scales), c.rows, c.cols, BITS, out, dst);
}

template <bool Ref>
void fp_pack(const CodesView& c, int64_t group, bool nibbles, void* const* outs) {
  const int64_t n = c.rows * c.cols;
  if (nibbles)
    (Ref ? pack_e2m1_ref : pack_e2m1)(c.codes, n, out_as<uint8_t>(outs, 0));
  else
    std::memcpy(outs[0], c.codes, static_cast<size_t>(n));
  std::memcpy(outs[1], c.scales, static_cast<size_t>(n / group));
}

template <int BITS, bool Ref>
void mxfp_pack(const CodesView& c, const EncodingParams&, void* const* outs) {
  fp_pack<Ref>(c, 32, BITS == 4, outs);
}

template <int BITS>
void mxfp_dequantize_ref(const void* const* ins, int64_t rows, int64_t cols, const EncodingParams&, float* out) {
  dequantize_mxfp_ref(in_as<uint8_t>(ins, 0), in_as<uint8_t>(ins, 1), mxfp_layout(rows, cols, BITS, "weight"), out);
}

// ---- NVFP4_E5M3 ----

std::vector<TensorSpec> nvfp4_specs(int64_t rows, int64_t cols, const EncodingParams&, DType) {
  if (rows <= 0 || cols <= 0 || cols % 16 != 0)
    throw OptionError("[nvfp4_e5m3] weight: in_features " + std::to_string(cols) +
                      " is not a multiple of the group size 16");
  return {{"weight_packed", DType::U8, {rows, cols / 2}},   // E2M1, element 2k in the low nibble
          {"weight_scale", DType::U8, {rows, cols / 16}}};  // UE5M3
}

template <bool Ref>
void nvfp4_quantize(const WeightView& w, const EncodingParams& p, void* const* outs) {
  (Ref ? quantize_nvfp4_e5m3_ref : quantize_nvfp4_e5m3)(w.dtype, w.data, w.rows, w.cols, p.opt_rtn,
                                                        out_as<uint8_t>(outs, 0), out_as<uint8_t>(outs, 1));
}

void nvfp4_encode_ref(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  std::vector<uint8_t> packed(static_cast<size_t>(w.rows * w.cols / 2)), scale(static_cast<size_t>(w.rows * w.cols / 16));
  quantize_nvfp4_e5m3_ref(w.dtype, w.data, w.rows, w.cols, p.opt_rtn, packed.data(), scale.data());
  fp_codes_of(packed.data(), scale.data(), w.rows * w.cols, w.rows * w.cols / 16, true, out);
}

void nvfp4_encode(const WeightView& w, const EncodingParams& p, CodesBuffers& out) {
  reject_imatrix(p, "nvfp4_e5m3");
  nvfp4_specs(w.rows, w.cols, p, w.dtype);  // shape check before any work
  std::vector<uint8_t> packed(static_cast<size_t>(w.rows * w.cols / 2)), scale(static_cast<size_t>(w.rows * w.cols / 16));
  quantize_nvfp4_e5m3(w.dtype, w.data, w.rows, w.cols, p.opt_rtn, packed.data(), scale.data());
  fp_codes_of(packed.data(), scale.data(), w.rows * w.cols, w.rows * w.cols / 16, true, out);
}

void nvfp4_dequantize_codes(const CodesView& c, const EncodingParams&, const WeightView*, DType out, void* dst) {
  dequantize_nvfp4_codes(c.codes, static_cast<const uint8_t*>(c.scales), c.rows, c.cols, out, dst);
}

// The codes the regular flow's packer reads back from the qdq weight: a value of zero (-0, or any value of a
// group whose scale byte is 0) becomes code 0. Model-free packs the quotient directly and keeps them.
std::vector<uint8_t> nvfp4_codes_from_qdq(const CodesView& c) {
  const int64_t n = c.rows * c.cols;
  const auto* scale = static_cast<const uint8_t*>(c.scales);
  std::vector<uint8_t> codes(c.codes, c.codes + n);
  for (int64_t i = 0; i < n; ++i)
    if (codes[i] == 0x8u || scale[i / 16] == 0) codes[i] = 0;
  return codes;
}

template <bool Ref>
void nvfp4_pack(const CodesView& c, const EncodingParams& p, void* const* outs) {
  if (!p.from_qdq) {
    fp_pack<Ref>(c, 16, true, outs);
    return;
  }
  const std::vector<uint8_t> codes = nvfp4_codes_from_qdq(c);
  CodesView v = c;
  v.codes = codes.data();
  fp_pack<Ref>(v, 16, true, outs);
}

void nvfp4_dequantize_ref(const void* const* ins, int64_t rows, int64_t cols, const EncodingParams&, float* out) {
  dequantize_nvfp4_e5m3_ref(in_as<uint8_t>(ins, 0), in_as<uint8_t>(ins, 1), rows, cols, out);
}

void nvfp4_fake(const WeightView& w, const EncodingParams& p, void* out) {
  fake_quantize_nvfp4_e5m3(w.dtype, w.data, w.rows, w.cols, p.opt_rtn, out);
}

bool int_gptq_bits(int b) { return b == 2 || b == 4 || b == 8; }
bool bits4(int b) { return b == 4; }
bool bits8(int b) { return b == 8; }

}  // namespace

int64_t TensorSpec::nbytes() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n * dtype_bits(dtype) / 8;
}

bool EncodingTraits::full_groups(int64_t cols, const EncodingParams& p) const {
  if (fixed_group) return cols % fixed_group == 0;
  // Per channel: one group of all inputs, which a padding row (GPTQ) also rounds up to whole packed words.
  if (p.group_size == -1) return !pads_partial_groups || cols % (32 / p.bits) == 0;
  return p.group_size > 0 && cols % p.group_size == 0;
}

bool EncodingTraits::accepts_model_free_format(std::string_view fmt) const {
  return std::find(model_free_formats.begin(), model_free_formats.end(), fmt) != model_free_formats.end();
}

const std::vector<EncodingTraits>& encodings() {
  // Every row's model-free formats include auto_round and auto_round:auto_gptq, upstream's base list.
  static const std::vector<EncodingTraits> table = {
      {Encoding::IntGptq, "int_gptq", "int", int_gptq_bits, 0, true, "auto_round:auto_gptq", "auto_round",
       kGptqZeroOffsetSym, kGptqZeroOffsetAsym, {"auto_round", "auto_round:auto_gptq"}, {"auto_round"},
       int_gptq_specs, int_gptq_quantize, int_gptq_quantize_ref, encode_int_rtn_ref, int_encode, int_gptq_pack<false>,
       int_gptq_pack<true>, int_gptq_dequantize_ref, nullptr, int_dequantize_codes},
      {Encoding::IntAwq, "int_awq", "int", bits4, 0, false, "auto_round:auto_awq", "auto_round:auto_awq", 0, 0, {}, {},
       int_awq_specs, int_awq_quantize<false>, int_awq_quantize<true>, encode_int_rtn_ref, int_encode,
       int_awq_pack<false>, int_awq_pack<true>, int_awq_dequantize_ref, nullptr, int_dequantize_codes},
      {Encoding::Mxfp4, "mxfp4", "mx_fp", bits4, 32, false, "auto_round:llm_compressor", "auto_round:llm_compressor", 0,
       0, {"auto_round", "auto_round:auto_gptq", "llm_compressor", "auto_round:llm_compressor"},
       {"auto_round", "llm_compressor"}, mxfp_specs<4>, mxfp_quantize<4, false>, mxfp_quantize<4, true>,
       mxfp_encode_ref<4>, mxfp_encode<4>, mxfp_pack<4, false>, mxfp_pack<4, true>, mxfp_dequantize_ref<4>, nullptr,
       mxfp_dequantize_codes<4>},
      {Encoding::Mxfp8, "mxfp8", "mx_fp", bits8, 32, false, "auto_round:llm_compressor", "auto_round:llm_compressor", 0,
       0, {"auto_round", "auto_round:auto_gptq", "llm_compressor", "auto_round:llm_compressor"},
       {"auto_round", "llm_compressor"}, mxfp_specs<8>, mxfp_quantize<8, false>, mxfp_quantize<8, true>,
       mxfp_encode_ref<8>, mxfp_encode<8>, mxfp_pack<8, false>, mxfp_pack<8, true>, mxfp_dequantize_ref<8>, nullptr,
       mxfp_dequantize_codes<8>},
      {Encoding::Nvfp4E5M3, "nvfp4_e5m3", "nvfp4_v2", bits4, 16, false, "auto_round:llm_compressor_nvfp4_e5m3",
       "auto_round:llm_compressor_nvfp4_e5m3", 0, 0,
       {"auto_round", "auto_round:auto_gptq", "fake", "llm_compressor", "auto_round:llm_compressor"}, {"auto_round"},
       nvfp4_specs, nvfp4_quantize<false>, nvfp4_quantize<true>, nvfp4_encode_ref, nvfp4_encode, nvfp4_pack<false>,
       nvfp4_pack<true>, nvfp4_dequantize_ref, nvfp4_fake, nvfp4_dequantize_codes},
  };
  return table;
}

const EncodingTraits& encoding(Encoding id) { return encodings()[static_cast<size_t>(id)]; }

const EncodingTraits* encoding_for(const SchemeFields& s, std::string_view format) {
  const int bits = s.bits.value_or(16);
  if (bits >= 16) return nullptr;
  const std::string dt = s.data_type.value_or("int");
  auto pick = [&](std::initializer_list<Encoding> ids) -> const EncodingTraits* {
    std::string names;
    for (Encoding id : ids) {
      const EncodingTraits& e = encoding(id);
      if (e.supports_bits(bits)) return &e;
      names += (names.empty() ? "" : ", ") + std::string(e.name);
    }
    throw OptionError("[encoding] bits=" + std::to_string(bits) + " with data_type '" + dt +
                      "' has no encoding (" + names + " hold other widths)");
  };
  if (dt.find("mx_fp") != std::string::npos) return pick({Encoding::Mxfp4, Encoding::Mxfp8});
  if (dt == "nvfp4_v2") return pick({Encoding::Nvfp4E5M3});
  // Every other data type is written as integers (upstream's model-free does the same); the scheme
  // validation rejects the ones it cannot honour before this point.
  if (format == "auto_awq" || format == "auto_round:auto_awq") return pick({Encoding::IntAwq});
  return pick({Encoding::IntGptq});
}

EncodingParams encoding_params(const EncodingTraits& enc, const SchemeFields& s, bool opt_rtn) {
  EncodingParams p;
  p.bits = s.bits.value_or(16);
  p.group_size = enc.fixed_group ? enc.fixed_group : s.group_size.value_or(128);
  p.sym = s.sym.value_or(true);
  p.opt_rtn = opt_rtn;
  return p;
}

}  // namespace fastround
