// The one place that knows how the core runs loops in parallel. Chunking is static so results
// never depend on the thread count; set_num_threads(1) forces the serial path in tests.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

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

// Runs fn(i) for i in [0, n). An exception escaping an OpenMP region calls std::terminate, so each
// iteration's is caught; the first one caught is rethrown on the calling thread once the loop is done,
// and the iterations not yet started are skipped. Inputs are validated before a loop starts: this is
// the safety net, not the error path.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
#ifdef _OPENMP
  std::exception_ptr first;
  std::mutex mu;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t i = 0; i < n; ++i) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!first) first = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (first) std::rethrow_exception(first);
#else
  for (int64_t i = 0; i < n; ++i) fn(i);
#endif
}

}  // namespace fastround
