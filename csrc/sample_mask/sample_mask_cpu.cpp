// CPU back end of tcm::sample_mask: rows in parallel (at::parallel_for); per row
// the keys of sample_mask.h in vectorisable loops, the M smallest (key, index)
// found by a branch-free quickselect on plain uint64 keys (linear time), then
// ids_keep / ids_restore filled by a running count (no sort at all). Every loop
// that branches on data is written branch-free: on random keys or scores such a
// branch is mispredicted about half the time, which cost more than the keys.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <string>
#include <vector>

#include "../common/cpu_dispatch.h"
#include "sample_mask_params.h"
#include "select.h"

namespace tcm {
namespace sample_mask {
namespace {

// Per-task scratch, reused across the rows of one task.
struct RowScratch {
  std::vector<uint64_t> key;    // per-patch keys (packed or 64-bit)
  std::vector<uint64_t> other;  // second key row / selection working copy
  std::vector<uint8_t> masked;  // 1 = masked
  std::vector<int64_t> keep;    // ids_keep of the row; one slot of slack for the branch-free fill
  explicit RowScratch(int64_t n) : key(n), other(n), masked(n), keep(n + 1) {}
};

// The key loops are plain element-wise loops over the row so that the compiler
// vectorises Philox and the portable log; target_clones adds AVX-512 and AVX2
// versions picked at load time (../common/cpu_dispatch.h). Vector and scalar IEEE +,-,*,/ round identically,
// and -ffp-contract=off keeps FMA out, so every clone yields the same bits.

// 32-bit keys are packed as key << 32 | patch: the packed values are unique and order
// exactly as (key, patch), so the k smallest packed values are the selection itself.
TCM_HOST_DEVICE uint64_t pack(uint64_t key32, int64_t patch) { return (key32 << 32) | static_cast<uint64_t>(patch); }

TCM_CLONES void packed_random_keys(uint64_t* key, int64_t n, uint64_t seed, uint64_t offset, uint32_t row) {
  for (int64_t i = 0; i < n; ++i) key[i] = pack(patch_words(seed, offset, row, static_cast<uint32_t>(i)).x[0], i);
}

TCM_CLONES void weighted_keys(uint64_t* key, const float* score, int64_t n, const Params& p, uint32_t row) {
  for (int64_t i = 0; i < n; ++i)
    key[i] = weighted_key(score[i], p.inv_temperature, patch_words(p.seed, p.offset, row, static_cast<uint32_t>(i)));
}

// Whether every score of the row is finite and >= 0 (one vectorised pass; NaN fails both tests).
// (An int accumulator: GCC does not vectorise the same loop over a bool.)
TCM_CLONES bool scores_valid(const float* score, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !((score[i] >= 0.0f) & (score[i] <= std::numeric_limits<float>::max()));
  return bad == 0;
}

// Masks the k smallest of `count` packed candidates (consumed in place).
void mask_smallest_packed(uint64_t* cand, int64_t count, int64_t k, uint8_t* masked) {
  if (k <= 0) return;
  if (k < count) select_kth(cand, count, k - 1);
  for (int64_t i = 0; i < k; ++i) masked[static_cast<uint32_t>(cand[i])] = 1;
}

// Masks the k smallest (64-bit key, index): the k-th smallest key t by selection,
// then every key < t and the lowest-index keys == t.
void mask_smallest_wide(RowScratch& rs, int64_t n, int64_t k, uint8_t* masked) {
  if (k <= 0) return;
  const uint64_t* key = rs.key.data();
  std::copy(key, key + n, rs.other.begin());
  const uint64_t t = select_kth(rs.other.data(), n, k - 1);
  int64_t below = 0, equal = 0;
  for (int64_t i = 0; i < n; ++i) {
    below += key[i] < t;
    equal += key[i] == t;
  }
  if (below + equal == k) {  // every key == t is masked (the usual case: t is unique), one vector pass
    for (int64_t i = 0; i < n; ++i) masked[i] = key[i] <= t;
    return;
  }
  int64_t ties = k - below;  // fewer than `equal`: the lowest indices win
  for (int64_t i = 0; i < n; ++i) {
    const bool eq = key[i] == t;
    masked[i] = (key[i] < t) | (eq & (ties > 0));
    ties -= eq;
  }
}

// Raises the error of the public API for scores that are negative, NaN or infinite. Off the
// hot path: only called once a row has failed scores_valid.
[[noreturn]] void throw_invalid_scores(const at::Tensor& scores) {
  const float* s = scores.data_ptr<float>();
  bool finite = true;
  float lo = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < scores.numel(); ++i) {
    finite &= std::isfinite(s[i]);
    lo = std::min(lo, s[i]);
  }
  TCM_CHECK_VALUE(finite, "sample_mask", "scores must be finite in float32 (no NaN or inf)");
  TCM_CHECK_VALUE(false, "sample_mask", "scores must be >= 0, got min ", lo);
  __builtin_unreachable();
}

void sample_row(const float* scores, int64_t n, int64_t num_masked, const Params& p, uint32_t row, RowScratch& rs) {
  uint8_t* masked = rs.masked.data();
  std::fill(masked, masked + n, uint8_t{0});
  uint64_t* key = rs.key.data();
  uint64_t* other = rs.other.data();
  switch (p.strategy) {
    case kUniform:
      packed_random_keys(key, n, p.seed, p.offset, row);
      mask_smallest_packed(key, n, num_masked, masked);
      break;
    case kWeighted:
      weighted_keys(key, scores, n, p, row);
      mask_smallest_wide(rs, n, num_masked, masked);
      break;
    case kStratified: {
      packed_random_keys(other, n, p.seed, p.offset, row);
      // compact the strata in one pass: ROI from the front of key, background from the back
      // (order within a stratum is free: packed keys carry their patch index). Both free ends
      // get the key and only one end moves: two stores instead of a branch, which GCC emits
      // for a select of the address.
      int64_t front = 0, back = n;
      for (int64_t i = 0; i < n; ++i) {
        const bool roi = scores[i] >= p.roi_threshold;
        key[front] = other[i];
        key[back - 1] = other[i];
        front += roi;
        back -= !roi;
      }
      const int64_t n_roi = front;
      const int64_t m_roi = stratified_roi_budget(n, n_roi, num_masked, p.roi_mask_ratio);
      mask_smallest_packed(key, n_roi, m_roi, masked);
      mask_smallest_packed(key + n_roi, n - n_roi, num_masked - m_roi, masked);
      break;
    }
    case kHardest: {
      const int64_t n_hard = hardest_budget(num_masked, p.hard_fraction);
      for (int64_t i = 0; i < n; ++i) key[i] = pack(hardest_score_key(scores[i]), i);
      mask_smallest_packed(key, n, n_hard, masked);
      packed_random_keys(other, n, p.seed, p.offset, row);
      int64_t rest = 0;
      for (int64_t i = 0; i < n; ++i) {
        key[rest] = other[i];  // rest <= i: stays in the row; a masked patch's write is overwritten
        rest += !masked[i];
      }
      mask_smallest_packed(key, rest, num_masked - n_hard, masked);
      break;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_mask_cpu(const at::Tensor& scores, int64_t num_masked,
                                                               c10::string_view strategy, int64_t seed, int64_t offset,
                                                               double temperature, double roi_threshold,
                                                               double roi_mask_ratio, double hard_fraction) {
  const Params p = make_params(scores, num_masked, strategy, seed, offset, temperature, roi_threshold, roi_mask_ratio,
                               hard_fraction);
  const int64_t b = scores.size(0), n = scores.size(1);
  const at::Tensor s = scores.contiguous();
  auto visible = at::empty({b, n}, scores.options().dtype(at::kBool));
  auto ids_keep = at::empty({b, n - num_masked}, scores.options().dtype(at::kLong));
  auto ids_restore = at::empty({b, n}, scores.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  bool* vis_ptr = visible.data_ptr<bool>();
  int64_t* keep_ptr = ids_keep.data_ptr<int64_t>();
  int64_t* restore_ptr = ids_restore.data_ptr<int64_t>();
  // Rows are independent; a task gets enough rows (~16k patches) to pay for the thread wake-up.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  const int64_t n_keep = n - num_masked;
  const bool check_scores = p.strategy != kUniform;
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_keep = n_keep;  // a local copy: stores through the output pointers may alias the capture
    RowScratch scratch(n);
    const uint8_t* masked = scratch.masked.data();
    int64_t* keep = scratch.keep.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* row_scores = s_ptr + r * n;
      if (check_scores && !scores_valid(row_scores, n)) throw_invalid_scores(s);
      sample_row(row_scores, n, num_masked, p, static_cast<uint32_t>(r), scratch);
      bool* vis_row = vis_ptr + r * n;
      int64_t* restore_row = restore_ptr + r * n;
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        const bool vis = !masked[i];
        vis_row[i] = vis;
        keep[kept] = i;  // a masked patch's write is overwritten by the next kept one (or lands in the slack)
        // vis ? kept : n_keep + (i - kept), as a mask: GCC compiles the select into a branch
        const int64_t slot_if_masked = row_keep + (i - kept);
        restore_row[i] = slot_if_masked + ((kept - slot_if_masked) & -static_cast<int64_t>(vis));
        kept += vis;
      }
      std::memcpy(keep_ptr + r * row_keep, keep, sizeof(int64_t) * row_keep);
    }
  });
  return std::make_tuple(visible, ids_keep, ids_restore);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) { m.impl("sample_mask", &sample_mask_cpu); }

}  // namespace sample_mask
}  // namespace tcm
