// Tile schedule and numerical constants of the tiled InfoNCE kernels, free of
// ATen so that CTest can exercise them (tests/cpp/test_info_nce_schedule.cpp).
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace tcm {
namespace info_nce {

// One (row tile, column tile) pair of the logits grid.
struct TilePair {
  int64_t row;
  int64_t col;
};

// The logits grid of n_row x n_col tiles is visited in steps. Within a step, the
// tasks touch pairwise different row tiles AND pairwise different column tiles,
// so every task may update the running row statistics / row gradients and the
// running column statistics / column gradients of its pair without atomics or
// per-thread buffers. With n_row <= n_col, step t pairs row tile k with column
// tile (k + t) mod n_col (a cyclic Latin-square order); the other case is the
// transpose. Over all steps every pair is visited exactly once, always in the
// same order, so results are deterministic for any thread count.
TCM_HOST_DEVICE int64_t schedule_steps(int64_t n_row, int64_t n_col) { return n_row > n_col ? n_row : n_col; }
TCM_HOST_DEVICE int64_t schedule_width(int64_t n_row, int64_t n_col) { return n_row < n_col ? n_row : n_col; }
TCM_HOST_DEVICE TilePair schedule_pair(int64_t step, int64_t task, int64_t n_row, int64_t n_col) {
  if (n_row <= n_col) return TilePair{task, (task + step) % n_col};
  return TilePair{(task + step) % n_row, task};
}

// A tile may share one exp offset (its maximum) between all its rows and columns
// when no row/column statistic lies more than this far below it: exp(+60) cannot
// overflow fp32 and terms that underflow are below e^-27 of their row's sum. The
// kernels otherwise fall back to one offset per row and one per column.
constexpr double kSharedOffsetMaxGap = 60.0;

}  // namespace info_nce
}  // namespace tcm
