// CPU back end of tcm::sample_mask: rows in parallel (at::parallel_for); per row
// the keys of sample_mask.h in vectorisable loops, the M smallest (key, index)
// found with std::nth_element on plain uint64 keys (linear time), then
// ids_keep / ids_restore filled by a running count (no sort at all).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <string>
#include <vector>

#include "sample_mask_params.h"

namespace tcm {
namespace sample_mask {
namespace {

// Per-row scratch, reused across the rows of one task.
struct RowScratch {
  std::vector<uint64_t> key;     // the key of every patch (or kExcluded)
  std::vector<uint64_t> sorted;  // copy for nth_element
  std::vector<uint64_t> words;   // random words, kept while the strata are cut
  explicit RowScratch(int64_t n) : key(n), sorted(n), words(n) {}
};

constexpr uint64_t kExcluded = ~uint64_t{0};  // above every 32-bit key: never selected

// The key loops are plain element-wise loops over the row so that the compiler
// vectorises Philox and the portable log; target_clones adds an AVX2 version
// picked at load time. Vector and scalar IEEE +,-,*,/ round identically, and
// -ffp-contract=off keeps FMA out, so every clone yields the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TCM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TCM_CLONES
#endif

TCM_CLONES void random_keys(uint64_t* key, int64_t n, uint64_t seed, uint64_t offset, uint32_t row) {
  for (int64_t i = 0; i < n; ++i) key[i] = patch_words(seed, offset, row, static_cast<uint32_t>(i)).x[0];
}

TCM_CLONES void weighted_keys(uint64_t* key, const float* score, int64_t n, const Params& p, uint32_t row) {
  for (int64_t i = 0; i < n; ++i)
    key[i] = weighted_key(score[i], p.inv_temperature, patch_words(p.seed, p.offset, row, static_cast<uint32_t>(i)));
}

// Masks the k smallest (key, index) among the non-excluded patches: the k-th
// smallest key t by nth_element, then every key < t and the lowest-index keys == t.
void mask_smallest(RowScratch& rs, int64_t n, int64_t k, uint8_t* masked) {
  if (k <= 0) return;
  std::copy(rs.key.begin(), rs.key.begin() + n, rs.sorted.begin());
  std::nth_element(rs.sorted.begin(), rs.sorted.begin() + (k - 1), rs.sorted.begin() + n);
  const uint64_t t = rs.sorted[k - 1];
  int64_t below = 0;
  for (int64_t i = 0; i < n; ++i) below += rs.key[i] < t;
  int64_t ties = k - below;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = rs.key[i];
    if (v < t || (v == t && ties-- > 0)) masked[i] = 1;
  }
}

void sample_row(const float* scores, int64_t n, int64_t num_masked, const Params& p, uint32_t row,
                uint8_t* masked, RowScratch& rs) {
  std::fill(masked, masked + n, uint8_t{0});
  uint64_t* key = rs.key.data();
  switch (p.strategy) {
    case kUniform:
      random_keys(key, n, p.seed, p.offset, row);
      mask_smallest(rs, n, num_masked, masked);
      break;
    case kWeighted:
      weighted_keys(key, scores, n, p, row);
      mask_smallest(rs, n, num_masked, masked);
      break;
    case kStratified: {
      int64_t n_roi = 0;
      for (int64_t i = 0; i < n; ++i) n_roi += scores[i] >= p.roi_threshold;
      const int64_t m_roi = stratified_roi_budget(n, n_roi, num_masked, p.roi_mask_ratio);
      random_keys(rs.words.data(), n, p.seed, p.offset, row);
      for (int pass = 0; pass < 2; ++pass) {  // ROI stratum, then background
        const bool want_roi = pass == 0;
        for (int64_t i = 0; i < n; ++i) key[i] = (scores[i] >= p.roi_threshold) == want_roi ? rs.words[i] : kExcluded;
        mask_smallest(rs, n, want_roi ? m_roi : num_masked - m_roi, masked);
      }
      break;
    }
    case kHardest: {
      const int64_t n_hard = hardest_budget(num_masked, p.hard_fraction);
      for (int64_t i = 0; i < n; ++i) key[i] = hardest_score_key(scores[i]);
      mask_smallest(rs, n, n_hard, masked);
      random_keys(key, n, p.seed, p.offset, row);
      for (int64_t i = 0; i < n; ++i)
        if (masked[i]) key[i] = kExcluded;
      mask_smallest(rs, n, num_masked - n_hard, masked);
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
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> masked(n);
    RowScratch scratch(n);
    for (int64_t r = begin; r < end; ++r) {
      sample_row(s_ptr + r * n, n, num_masked, p, static_cast<uint32_t>(r), masked.data(), scratch);
      int64_t kept = 0, dropped = 0;
      const int64_t n_keep = n - num_masked;
      for (int64_t i = 0; i < n; ++i) {
        const bool vis = !masked[i];
        vis_ptr[r * n + i] = vis;
        if (vis) {
          keep_ptr[r * n_keep + kept] = i;
          restore_ptr[r * n + i] = kept++;
        } else {
          restore_ptr[r * n + i] = n_keep + dropped++;
        }
      }
    }
  });
  return std::make_tuple(visible, ids_keep, ids_restore);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) { m.impl("sample_mask", &sample_mask_cpu); }

}  // namespace sample_mask
}  // namespace tcm
