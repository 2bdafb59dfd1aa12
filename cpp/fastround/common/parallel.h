// The one place that knows how the core runs loops in parallel. Chunking is static so results
// never depend on the thread count; set_num_threads(1) forces the serial path in tests.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastround {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_num_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

// Runs fn(i) for i in [0, n). fn must not throw; collect errors into per-index slots instead.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
#else
  for (int64_t i = 0; i < n; ++i) fn(i);
#endif
}

}  // namespace fastround
