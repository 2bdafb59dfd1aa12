// SignRound's optimizer step (signround.md §2.7): p <- p - lr * sign(d), d the gradient or, with momentum, the
// buffer mu * buf + g (the first step copies g), as torch's SGD with weight decay and dampening 0. Range factors
// are clamped to [0, clamp_hi] after the step (1, or 2 for SignRoundV2's max_scale): upstream clamps them at the
// next forward, before any use, so the values the forward and the best-parameter snapshot see are the same.
// sign(NaN) is 0 as in torch.sign on the CPU: a NaN gradient leaves its parameter where it is.
#pragma once

#include <cstdint>

namespace fastround::tune {

struct SignSgdParams {
  float lr = 0;
  float momentum = 0;   // 0: plain sign-SGD, no buffer
  bool first = true;    // momentum: the buffer starts as a copy of the gradient
  bool clamp01 = false; // range factors: clamped to [0, clamp_hi]
  float clamp_hi = 1.0f; // the factors' upper bound (upstream's minmax_scale_bound)
};

// One parameter tensor of a step (a list of them is what the CUDA step takes in one launch).
struct SignSgdTensor {
  float* p = nullptr;
  const float* g = nullptr;
  float* buf = nullptr;  // null without momentum
  int64_t n = 0;
};

// Parameter and gradient present when n > 0, a buffer when momentum != 0; throws OptionError naming `site`.
void sign_sgd_check(const float* p, const float* g, const float* buf, int64_t n, const SignSgdParams& params,
                    const char* site);

// p [n] fp32 updated in place from g [n]; buf [n] is the momentum buffer (required when momentum != 0).
void sign_sgd_step_ref(float* p, const float* g, float* buf, int64_t n, const SignSgdParams& params);
void sign_sgd_step(float* p, const float* g, float* buf, int64_t n, const SignSgdParams& params);

}  // namespace fastround::tune
