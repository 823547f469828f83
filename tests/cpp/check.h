// Minimal test harness for the CTest suite: CHECK_EQ records failures, main returns their count.
#pragma once
#include <cstdio>

inline int& tcm_failures() {
  static int n = 0;
  return n;
}

#define CHECK_EQ(a, b)                                                                                     \
  do {                                                                                                     \
    const auto va = (a);                                                                                   \
    const auto vb = (b);                                                                                   \
    if (!(va == vb)) {                                                                                     \
      std::printf("%s:%d: CHECK_EQ(%s, %s) failed: 0x%llx vs 0x%llx\n", __FILE__, __LINE__, #a, #b,       \
                  (unsigned long long)va, (unsigned long long)vb);                                         \
      ++tcm_failures();                                                                                    \
    }                                                                                                      \
  } while (0)

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::printf("%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);   \
      ++tcm_failures();                                                      \
    }                                                                        \
  } while (0)
