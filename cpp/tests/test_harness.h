// What the plain C++ kernel tests share: a pass / fail tally whose last line ("N passed, N failed") pytest reads,
// byte comparison of outputs, and running the fast kernels at several thread counts against one reference.
#pragma once

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fastround/common/parallel.h"

namespace fastround::test {

inline int passed = 0, failed = 0;

inline void check(bool ok, const std::string& what) {
  ok ? ++passed : ++failed;
  if (!ok) std::printf("FAIL %s\n", what.c_str());
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Runs body(tag) at 1 and 3 threads (a serial run and an uneven split of the rows), tag naming the case and the
// count; leaves 4 threads set for what follows.
template <typename F>
void at_thread_counts(const std::string& name, F&& body) {
  for (int threads : {1, 3}) {
    set_num_threads(threads);
    body(name + " threads " + std::to_string(threads));
  }
  set_num_threads(4);
}

// Prints the tally line and gives main's exit status.
inline int report() {
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

}  // namespace fastround::test
