// select_kth (the CPU sample_mask's selection) against a full sort, on the inputs that
// break quickselects: sorted and reversed rows, many equal keys, all keys equal, an
// organ-pipe row, and random rows of the sizes the sampler sees (a stratum of 1..4096).
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "sample_mask/select.h"

using tcm::sample_mask::select_kth;

namespace {

// select_kth returns the (k+1)-th smallest and leaves the k+1 smallest in front.
void check_row(const std::vector<uint64_t>& row) {
  const int64_t n = static_cast<int64_t>(row.size());
  std::vector<uint64_t> sorted = row;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t k : {int64_t{0}, n / 3, n / 2, (n * 6) / 10, n - 1}) {
    std::vector<uint64_t> a = row;
    const uint64_t t = select_kth(a.data(), n, k);
    CHECK_EQ(t, sorted[k]);
    CHECK_EQ(a[k], sorted[k]);
    std::vector<uint64_t> front(a.begin(), a.begin() + k + 1);
    std::sort(front.begin(), front.end());
    CHECK(std::equal(front.begin(), front.end(), sorted.begin()));  // same multiset: nothing lost or duplicated
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  for (int64_t n : {1, 2, 17, 33, 98, 196, 1031, 4096}) {
    std::vector<uint64_t> random(n), ascending(n), descending(n), few(n), equal(n, 42), pipe(n);
    for (int64_t i = 0; i < n; ++i) {
      random[i] = rng();
      ascending[i] = static_cast<uint64_t>(i);
      descending[i] = static_cast<uint64_t>(n - i);
      few[i] = rng() % 3;
      pipe[i] = static_cast<uint64_t>(std::min(i, n - 1 - i));
    }
    for (const auto* row : {&random, &ascending, &descending, &few, &equal, &pipe}) check_row(*row);
  }
  return tcm_failures();
}
