#include "fastround/tune/sign_sgd.h"

#include <algorithm>

#include "fastround/common/error.h"
#include "fastround/common/parallel.h"

namespace fastround::tune {

namespace {

// torch.sign on the CPU: (0 < d) - (d < 0), so a NaN gradient (an overflowed scale gradient) moves nothing.
inline float sign_of(float d) { return d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f); }

inline float step_one(float p, float g, float* buf, const SignSgdParams& s) {
  float d = g;
  if (s.momentum != 0) {
    *buf = s.first ? g : *buf * s.momentum + g;
    d = *buf;
  }
  float out = p + (-s.lr) * sign_of(d);
  if (s.clamp01) out = std::min(std::max(out, 0.0f), s.clamp_hi);
  return out;
}

}  // namespace

void sign_sgd_check(const float* p, const float* g, const float* buf, int64_t n, const SignSgdParams& s,
                    const char* site) {
  if (n > 0 && (!p || !g)) throw OptionError(std::string("[") + site + "] parameter and gradient are required");
  if (s.momentum != 0 && n > 0 && !buf)
    throw OptionError(std::string("[") + site + "] momentum needs a buffer");
}

void sign_sgd_step_ref(float* p, const float* g, float* buf, int64_t n, const SignSgdParams& s) {
  sign_sgd_check(p, g, buf, n, s, "sign_sgd_step_ref");
  for (int64_t i = 0; i < n; ++i) p[i] = step_one(p[i], g[i], buf ? buf + i : nullptr, s);
}

void sign_sgd_step(float* p, const float* g, float* buf, int64_t n, const SignSgdParams& s) {
  sign_sgd_check(p, g, buf, n, s, "sign_sgd_step");
  constexpr int64_t kChunk = 1 << 16;  // small tensors stay on one thread
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  parallel_for(chunks, [&](int64_t c) {
    const int64_t i0 = c * kChunk, i1 = std::min(n, i0 + kChunk);
    for (int64_t i = i0; i < i1; ++i) p[i] = step_one(p[i], g[i], buf ? buf + i : nullptr, s);
  });
}

}  // namespace fastround::tune
