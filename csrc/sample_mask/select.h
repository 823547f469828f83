// Selection of the k-th smallest of a row of uint64 keys, for the CPU back end of
// tcm::sample_mask (host only, no ATen, so that tests/cpp/test_select.cpp covers it).
#pragma once

#include <algorithm>
#include <cstdint>

namespace tcm {
namespace sample_mask {

// Reorders a[0, n) so that a[0, k] are its k + 1 smallest values, a[k] the (k+1)-th; returns a[k].
// Quickselect with a median-of-three pivot and a branch-free Lomuto partition; after
// 2 log2(n) rounds without convergence (many equal keys, adversarial order) it hands
// the rest to std::nth_element, whose introselect bounds the worst case.
inline uint64_t select_kth(uint64_t* a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n;  // a[k] lies in [lo, hi); a[0, lo) <= a[lo, hi) <= a[hi, n)
  int rounds = 0;
  for (int64_t len = n; len > 1; len >>= 1) rounds += 2;
  while (hi - lo > 16 && rounds-- > 0) {
    const uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
    const uint64_t pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));
    int64_t j = lo;  // a[lo, j) < pivot <= a[j, i)
    for (int64_t i = lo; i < hi; ++i) {
      const uint64_t v = a[i];
      a[i] = a[j];
      a[j] = v;
      j += v < pivot;
    }
    // the pivot is in [j, hi) and j > lo unless the pivot is the range's minimum
    if (k < j) {
      hi = j;
    } else {
      lo = j;
    }
  }
  std::nth_element(a + lo, a + k, a + hi);
  return a[k];
}

}  // namespace sample_mask
}  // namespace tcm
