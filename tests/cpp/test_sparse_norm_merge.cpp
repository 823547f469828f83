// Chan's merge of partial moments (csrc/sparse_norm/sparse_norm.h): merging chunk
// moments in any split equals the two-pass moments of the whole, and a large mean
// does not cancel the variance in float.
#include <cmath>
#include <cstdio>
#include <vector>

#include "check.h"
#include "sparse_norm/sparse_norm.h"

using tcm::sparse_norm::merge_moments;
using tcm::sparse_norm::Moments;

template <typename T>
static Moments<T> merged(const std::vector<double>& x, size_t chunk) {
  Moments<T> m{0, 0, 0};
  for (size_t s = 0; s < x.size(); s += chunk) {
    const size_t e = s + chunk < x.size() ? s + chunk : x.size();
    T sum = 0;
    for (size_t i = s; i < e; ++i) sum += static_cast<T>(x[i]);
    const T n = static_cast<T>(e - s), mean = sum / n;
    T q = 0;
    for (size_t i = s; i < e; ++i) q += (static_cast<T>(x[i]) - mean) * (static_cast<T>(x[i]) - mean);
    merge_moments(m, n, mean, q);
  }
  return m;
}

int main() {
  std::vector<double> x;
  unsigned state = 12345u;
  for (int i = 0; i < 1000; ++i) {  // 1e4 + deterministic noise in [-1, 1)
    state = state * 1664525u + 1013904223u;
    x.push_back(1.0e4 + (static_cast<double>(state >> 8) / 8388608.0 - 1.0));
  }
  double mean = 0, q = 0;
  for (double v : x) mean += v;
  mean /= x.size();
  for (double v : x) q += (v - mean) * (v - mean);
  for (size_t chunk : {1u, 7u, 64u, 512u, 1000u}) {
    const auto d = merged<double>(x, chunk);
    CHECK(d.count == 1000.0);
    CHECK(std::fabs(d.mean - mean) < 1e-9);
    CHECK(std::fabs(d.m2 - q) < 1e-7 * q);
    const auto f = merged<float>(x, chunk);  // float: inputs round to 1e-3 at 1e4, the variance stays within 1 %
    CHECK(std::fabs(f.m2 / 1000.0f - static_cast<float>(q / 1000.0)) < 0.01f * static_cast<float>(q / 1000.0));
  }
  Moments<float> empty{0, 0, 0};
  merge_moments(empty, 0.0f, 5.0f, 1.0f);  // an empty part changes nothing
  CHECK(empty.count == 0.0f && empty.mean == 0.0f && empty.m2 == 0.0f);
  if (tcm_failures() == 0) std::printf("test_sparse_norm_merge: ok\n");
  return tcm_failures();
}
