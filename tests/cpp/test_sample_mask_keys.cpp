// Host-device key logic of sample_mask: portable log accuracy, float order
// mapping and the stratum budgets, independent of ATen.
#include <cmath>
#include <cstdio>

#include "check.h"
#include "sample_mask/sample_mask.h"

using namespace tcm::sample_mask;

int main() {
  // log_portable within 2 ulp-ish of the correctly rounded log over a sweep that
  // covers subnormals, the sqrt(2) fold and large values.
  double worst = 0;
  for (uint32_t bits = 1; bits < 0x7F800000u; bits += 4099u) {  // every binade, subnormals included
    const float x = tcm::uint_as_float(bits);
    const double rel = std::fabs(tcm::sample_mask::log_portable(x) - std::log((double)x));
    const double tol = 3e-7 * std::fmax(1.0, std::fabs(std::log((double)x)));
    worst = std::fmax(worst, rel / tol);
  }
  std::printf("log_portable worst error / tolerance = %.3f\n", worst);
  CHECK(worst <= 1.0);
  CHECK(log_portable(1.0f) == 0.0f);

  // ordered_bits is monotone and identifies -0 with +0.
  const float vals[] = {-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-40f, 2.0f, INFINITY};
  for (int i = 0; i + 1 < 8; ++i) CHECK(ordered_bits(vals[i]) <= ordered_bits(vals[i + 1]));
  CHECK_EQ(ordered_bits(-0.0f), ordered_bits(0.0f));
  CHECK(ordered_bits(-3.5f) < ordered_bits(-1e-30f));

  // uniform_open stays inside (0, 1) at both ends of the word range.
  CHECK(uniform_open(0u) > 0.0f);
  CHECK(uniform_open(0xFFFFFFFFu) < 1.0f);

  // Stratum budgets: requested share when both strata fit, spill otherwise.
  CHECK_EQ(stratified_roi_budget(100, 20, 40, 0.75), 15);  // 15 ROI + 25 background
  CHECK_EQ(stratified_roi_budget(100, 90, 40, 0.1), 30);   // background holds only 10
  CHECK_EQ(stratified_roi_budget(100, 10, 40, 1.0), 10);   // ROI smaller than its share
  CHECK_EQ(stratified_roi_budget(100, 0, 40, 0.9), 0);     // empty ROI
  CHECK_EQ(stratified_roi_budget(100, 100, 40, 0.2), 40);  // all ROI
  CHECK_EQ(hardest_budget(10, 0.25), 3);                   // 2.5 rounds half up
  CHECK_EQ(hardest_budget(10, 1.0), 10);
  return tcm_failures();
}
