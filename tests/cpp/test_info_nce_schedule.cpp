// The tile schedule of the InfoNCE CPU kernels: every (row, col) tile pair is
// visited exactly once and no step has two tasks on one row or one column tile.
#include <vector>

#include "check.h"
#include "info_nce/info_nce.h"

using namespace tcm::info_nce;

static void check_grid(int64_t n_row, int64_t n_col) {
  std::vector<int> seen(n_row * n_col, 0);
  const int64_t steps = schedule_steps(n_row, n_col), width = schedule_width(n_row, n_col);
  CHECK_EQ(steps * width, n_row * n_col);
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<int> row_used(n_row, 0), col_used(n_col, 0);
    for (int64_t k = 0; k < width; ++k) {
      const TilePair p = schedule_pair(t, k, n_row, n_col);
      CHECK(p.row >= 0 && p.row < n_row && p.col >= 0 && p.col < n_col);
      CHECK_EQ(row_used[p.row]++, 0);
      CHECK_EQ(col_used[p.col]++, 0);
      ++seen[p.row * n_col + p.col];
    }
  }
  for (int v : seen) CHECK_EQ(v, 1);
}

int main() {
  const int64_t sizes[] = {1, 2, 3, 7, 16};
  for (int64_t r : sizes)
    for (int64_t c : sizes) check_grid(r, c);
  return tcm_failures();
}
