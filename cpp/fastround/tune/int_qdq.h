// SignRound's INT quantize-dequantize with trainable rounding offsets V and range factors, forward and
// straight-through backward, with the rounding of upstream's torch ops (signround.md §2.5): the weight keeps its
// dtype, the scale is cast to scale_dtype inside the qdq, V and the factors are fp32. One pass reads a group
// once for the forward and once for the backward; nothing is saved between the two (q is recomputed).
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround::tune {

struct IntQdqParams {
  int bits = 4;
  int64_t group_size = 128;       // -1: one group per row; a partial last group is zero-padded, as upstream
  bool sym = true;                // full-range sym (the dominant extreme maps to -2^(b-1)) or asym
  DType scale_dtype = DType::F16; // F16, BF16 or F32: what the scale is rounded to inside the qdq
  float scale_thresh = 1e-5f;     // |scale| floor (upstream's q_scale_thresh), itself rounded to scale_dtype
};

// The tensors of one wrapped layer. `groups` per row and `group` inputs per group follow upstream's padding.
struct IntQdqView {
  DType dtype = DType::BF16;          // weight and qdq dtype: F32, F16, BF16
  const void* weight = nullptr;       // [rows, cols]
  int64_t rows = 0, cols = 0;
  int64_t group = 0, groups = 0;      // inputs per group (padding included), groups per row
  const float* v = nullptr;           // [rows*groups, group] rounding offsets
  const float* min_scale = nullptr;   // [rows*groups] factors in [0, 1]; nullptr: 1
  const float* max_scale = nullptr;   // [rows*groups]; nullptr: 1
  const float* wmin = nullptr;        // [rows*groups] min(0, min of the group), frozen at wrap time
  const float* wmax = nullptr;        // [rows*groups] max(0, max of the group)
  // SignRoundV2 (enable_alg_ext, sym only): [rows*groups] the searched init scale (its weight-dtype value as fp32);
  // the scale is then init_scale * max_scale rounded to scale_dtype and floored, min_scale and the extremes unused
  // (min_scale gets no gradient). nullptr: the scale comes from the extremes and both factors.
  const float* init_scale = nullptr;
};

// Fills the view's group/groups from rows, cols and params.group_size; throws OptionError naming `site`.
void int_qdq_layout(IntQdqView& view, const IntQdqParams& params, const char* site);

// What every kernel entry (CPU and CUDA) checks first: weight dtype, scale dtype, bits, the required pointers and
// a layout that covers the columns; throws OptionError naming `site`.
void int_qdq_check(const IntQdqView& view, const IntQdqParams& params, const char* site);

// wmin/wmax [rows*groups] of a weight [rows, cols] (exact in fp32), as upstream freezes them when it wraps.
void int_group_extremes(DType dtype, const void* weight, int64_t rows, int64_t cols, int64_t group, int64_t groups,
                        float* wmin, float* wmax);

// Forward: qdq [rows, cols] in view.dtype; scale [rows*groups] (the value after the scale_dtype cast and the
// floor, as fp32); optional codes [rows, cols] uint8 (q + 2^(b-1) sym, q asym) and zeros [rows*groups] int32
// (2^(b-1) sym, the rounded zero point asym): what the packers take.
void int_qdq_forward_ref(const IntQdqView& view, const IntQdqParams& params, void* qdq, float* scale,
                         uint8_t* codes = nullptr, int32_t* zeros = nullptr);
void int_qdq_forward(const IntQdqView& view, const IntQdqParams& params, void* qdq, float* scale,
                     uint8_t* codes = nullptr, int32_t* zeros = nullptr);

// Backward of the forward's qdq: grad [rows, cols] in view.dtype in; grad_v [rows*groups, group] and, when not
// null, grad_min / grad_max [rows*groups] out (overwritten, fp32). Straight-through rounding; clamped elements
// pass no gradient to V; the scale's gradient is rounded to scale_dtype as torch's autograd does for a
// scale_dtype tensor; max() ties split the gradient in halves.
void int_qdq_backward_ref(const IntQdqView& view, const IntQdqParams& params, const void* grad, float* grad_v,
                          float* grad_min, float* grad_max);
void int_qdq_backward(const IntQdqView& view, const IntQdqParams& params, const void* grad, float* grad_v,
                      float* grad_min, float* grad_max);

}  // namespace fastround::tune
