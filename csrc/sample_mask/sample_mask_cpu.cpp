// CPU back end of tcm::sample_mask: one row per task (at::parallel_for), the
// M smallest (key, index) pairs found with std::nth_element (linear time), then
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

struct KeyedPatch {
  uint64_t key;
  int64_t index;
  bool operator<(const KeyedPatch& o) const { return key < o.key || (key == o.key && index < o.index); }
};

// Marks the k smallest of `cand` in `masked`.
void mask_smallest(std::vector<KeyedPatch>& cand, int64_t k, uint8_t* masked) {
  if (k <= 0) return;
  if (k < static_cast<int64_t>(cand.size())) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end());
  for (int64_t i = 0; i < k; ++i) masked[cand[i].index] = 1;
}

void sample_row(const float* scores, int64_t n, int64_t num_masked, const Params& p, uint32_t row,
                uint8_t* masked, std::vector<KeyedPatch>& cand) {
  std::fill(masked, masked + n, uint8_t{0});
  cand.clear();
  switch (p.strategy) {
    case kUniform:
      for (int64_t i = 0; i < n; ++i) cand.push_back({patch_words(p.seed, p.offset, row, i).x[0], i});
      mask_smallest(cand, num_masked, masked);
      break;
    case kWeighted:
      for (int64_t i = 0; i < n; ++i)
        cand.push_back({weighted_key(scores[i], p.inv_temperature, patch_words(p.seed, p.offset, row, i)), i});
      mask_smallest(cand, num_masked, masked);
      break;
    case kStratified: {
      int64_t n_roi = 0;
      for (int64_t i = 0; i < n; ++i) n_roi += scores[i] >= p.roi_threshold;
      const int64_t m_roi = stratified_roi_budget(n, n_roi, num_masked, p.roi_mask_ratio);
      for (int pass = 0; pass < 2; ++pass) {  // ROI stratum, then background
        const bool want_roi = pass == 0;
        cand.clear();
        for (int64_t i = 0; i < n; ++i)
          if ((scores[i] >= p.roi_threshold) == want_roi) cand.push_back({patch_words(p.seed, p.offset, row, i).x[0], i});
        mask_smallest(cand, want_roi ? m_roi : num_masked - m_roi, masked);
      }
      break;
    }
    case kHardest: {
      const int64_t n_hard = hardest_budget(num_masked, p.hard_fraction);
      for (int64_t i = 0; i < n; ++i) cand.push_back({hardest_score_key(scores[i]), i});
      mask_smallest(cand, n_hard, masked);
      cand.clear();
      for (int64_t i = 0; i < n; ++i)
        if (!masked[i]) cand.push_back({patch_words(p.seed, p.offset, row, i).x[0], i});
      mask_smallest(cand, num_masked - n_hard, masked);
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
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> masked(n);
    std::vector<KeyedPatch> cand;
    cand.reserve(n);
    for (int64_t r = begin; r < end; ++r) {
      sample_row(s_ptr + r * n, n, num_masked, p, static_cast<uint32_t>(r), masked.data(), cand);
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
