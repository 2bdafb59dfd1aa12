// Counting NaN and Inf values in a weight before it is quantized: one such value turns its group's
// scale into NaN, silently (upstream writes those scales).
#pragma once

#include <cstdint>

#include "fastround/common/dtype.h"

namespace fastround {

// Number of NaN or +/-Inf elements among the first n of `data` (F32, F16 or BF16); throws OptionError
// for any other dtype.
int64_t count_nonfinite_ref(DType dtype, const void* data, int64_t n);
int64_t count_nonfinite(DType dtype, const void* data, int64_t n);

}  // namespace fastround
