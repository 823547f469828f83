// Host+device pieces of the sparse (masked) normalizations: merging partial
// moments. Every sparse norm (batch, instance, group) reduces each (sample,
// channel) plane of a masked-dense tensor to (count, mean, M2) over its active
// sites, then merges planes into its statistic groups. Merging (count, mean, M2)
// triples (Chan, Golub & LeVeque 1979) never forms sum(x^2) - n mean^2, so a large
// mean cannot cancel the variance away.
#pragma once

#include "../common/host_device.h"

namespace tcm {
namespace sparse_norm {

template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;  // sum of squared deviations from mean
};

// Merges the moments of a disjoint part (count_b, mean_b, m2_b) into a.
template <typename acc_t>
TCM_HOST_DEVICE void merge_moments(Moments<acc_t>& a, acc_t count_b, acc_t mean_b, acc_t m2_b) {
  if (count_b <= acc_t(0)) return;
  const acc_t total = a.count + count_b;
  const acc_t delta = mean_b - a.mean;
  const acc_t share = count_b / total;
  a.mean += delta * share;
  a.m2 += m2_b + delta * delta * a.count * share;
  a.count = total;
}

}  // namespace sparse_norm
}  // namespace tcm
