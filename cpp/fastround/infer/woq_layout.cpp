#include "fastround/infer/woq_layout.h"

#include <cstring>

#include "fastround/common/error.h"

namespace fastround::infer {

namespace {

std::string shape2(const int64_t s[2]) { return "[" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + "]"; }

void expect_shape(const char* site, const char* name, const int64_t got[2], int64_t rows, int64_t cols,
                  const std::string& why) {
  if (got[0] == rows && got[1] == cols) return;
  const int64_t want[2] = {rows, cols};
  throw OptionError(std::string("[") + site + "] " + name + ": expected " + shape2(want) + " (" + why + "), got " +
                    shape2(got));
}

}  // namespace

WoqLayout parse_woq_layout(const std::string& name, const char* site, bool* tiled) {
  static const std::string kSuffix = "_tiled";
  if (tiled) {
    *tiled = name.size() > kSuffix.size() && name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0;
    const std::string base = *tiled ? name.substr(0, name.size() - kSuffix.size()) : name;
    if (*tiled && base != "gptq" && base != "gptq_v2")
      throw OptionError(std::string("[") + site + "] layout: '" + name + "': only gptq and gptq_v2 words are tiled");
    if (*tiled) return parse_woq_layout(base, site, nullptr);
  }
  if (name == "gptq") return WoqLayout::Gptq;
  if (name == "gptq_v2") return WoqLayout::GptqV2;
  if (name == "awq") return WoqLayout::Awq;
  throw OptionError(std::string("[") + site + "] layout: unknown '" + name + "' (expected gptq, gptq_v2 or awq)");
}

const char* woq_layout_name(WoqLayout layout) {
  switch (layout) {
    case WoqLayout::Gptq: return "gptq";
    case WoqLayout::GptqV2: return "gptq_v2";
    case WoqLayout::Awq: return "awq";
  }
  return "?";
}

void woq_resolve(WoqWeightView& v, int64_t in, int64_t group_size, const int64_t qw[2], const int64_t qz[2],
                 const int64_t sc[2], const char* site) {
  const std::string at = std::string("[") + site + "] ";
  if (v.bits != 2 && v.bits != 4 && v.bits != 8)
    throw OptionError(at + "bits: " + std::to_string(v.bits) + " is not served (expected 2, 4 or 8)");
  if (v.layout == WoqLayout::Awq && v.bits != 4)
    throw OptionError(at + "bits: the awq layout stores 4-bit codes only, got " + std::to_string(v.bits));
  if (in <= 0) throw OptionError(at + "x: the last dimension (in_features) must be positive");
  if (group_size != -1 && group_size <= 0)
    throw OptionError(at + "group_size: expected -1 (per channel) or a positive count, got " +
                      std::to_string(group_size));
  if (v.scale_dtype != DType::F16 && v.scale_dtype != DType::BF16 && v.scale_dtype != DType::F32)
    throw OptionError(at + "scales: dtype must be float16, bfloat16 or float32, got " + std::string(dtype_name(v.scale_dtype)));
  v.in = in;
  v.group = group_size == -1 || group_size > in ? in : group_size;
  v.groups = (in + v.group - 1) / v.group;
  const int pf = v.pack_factor();
  if (v.layout == WoqLayout::Awq) {
    v.out = qw[1] * pf;
    expect_shape(site, "qweight", qw, in, qw[1], "awq: [in_features, out_features/8] with in_features from x");
  } else {
    v.out = qw[1];
    // Packers pad inputs to whole groups and whole words; any padding beyond the words x needs is tolerated.
    if (qw[0] < v.qweight_rows())
      throw OptionError(at + "qweight: expected at least " + std::to_string(v.qweight_rows()) + " rows (" +
                        std::to_string(in) + " inputs / " + std::to_string(pf) + " per int32), got " + shape2(qw));
  }
  if (v.out <= 0) throw OptionError(at + "qweight: no output features, got " + shape2(qw));
  v.qrows = qw[0];
  if (v.tile && (v.layout == WoqLayout::Awq || v.out % v.tile != 0))
    throw OptionError(at + "qweight: tiled words need a gptq layout and out_features a multiple of " +
                      std::to_string(v.tile) + ", got " + shape2(qw) + " (" + woq_layout_name(v.layout) + ")");
  const std::string grouping = std::to_string(v.groups) + " groups of " + std::to_string(v.group) + " inputs";
  expect_shape(site, "scales", sc, v.groups, v.out, "[groups, out_features]: " + grouping);
  expect_shape(site, "qzeros", qz, v.groups, v.qzeros_cols(),
               "[groups, out_features/" + std::to_string(pf) + "]: " + grouping);
}

void woq_tile_qweight(const int32_t* src, int64_t rows, int64_t out, int32_t* dst) {
  for (int64_t t = 0; t < out / kWoqTile; ++t)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + (t * rows + r) * kWoqTile, src + r * out + t * kWoqTile, kWoqTile * sizeof(int32_t));
}

void woq_untile_qweight(const int32_t* src, int64_t rows, int64_t out, int32_t* dst) {
  for (int64_t t = 0; t < out / kWoqTile; ++t)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + r * out + t * kWoqTile, src + (t * rows + r) * kWoqTile, kWoqTile * sizeof(int32_t));
}

}  // namespace fastround::infer
