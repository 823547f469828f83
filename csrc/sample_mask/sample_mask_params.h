// Host-side argument checking and packing shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>

#include "../common/checks.h"
#include "sample_mask.h"

namespace tcm {
namespace sample_mask {

struct Params {
  Strategy strategy;
  uint64_t seed;
  uint64_t offset;
  float inv_temperature;
  float roi_threshold;
  double roi_mask_ratio;
  double hard_fraction;
};

inline Strategy parse_strategy(c10::string_view s) {
  if (s == "uniform") return kUniform;
  if (s == "weighted") return kWeighted;
  if (s == "stratified") return kStratified;
  if (s == "hardest") return kHardest;
  TCM_CHECK_VALUE(false, "sample_mask", "strategy must be one of 'uniform', 'weighted', 'stratified', 'hardest', got '",
                  std::string(s), "'");
  return kUniform;
}

inline Params make_params(const at::Tensor& scores, int64_t num_masked, c10::string_view strategy, int64_t seed,
                          int64_t offset, double temperature, double roi_threshold, double roi_mask_ratio,
                          double hard_fraction) {
  TCM_CHECK_VALUE(scores.dim() == 2, "sample_mask", "scores must be 2-D [B, N], got ", scores.dim(), "-D");
  TCM_CHECK_TYPE(scores.scalar_type() == at::kFloat, "sample_mask", "compiled kernels take float32 scores, got ",
                 scores.scalar_type());
  TCM_CHECK_VALUE(scores.size(1) < (int64_t{1} << 31) && scores.size(0) < (int64_t{1} << 31), "sample_mask",
                  "scores must have fewer than 2^31 rows and columns, got ", scores.sizes());
  TCM_CHECK_VALUE(num_masked >= 0 && num_masked <= scores.size(1), "sample_mask", "num_masked must be in [0, ",
                  scores.size(1), "], got ", num_masked);
  TCM_CHECK_VALUE(seed >= 0 && offset >= 0, "sample_mask", "seed and offset must be >= 0, got ", seed, " and ", offset);
  TCM_CHECK_VALUE(temperature > 0, "sample_mask", "temperature must be > 0, got ", temperature);
  return Params{parse_strategy(strategy),
                static_cast<uint64_t>(seed),
                static_cast<uint64_t>(offset),
                static_cast<float>(1.0 / temperature),
                static_cast<float>(roi_threshold),
                roi_mask_ratio,
                hard_fraction};
}

}  // namespace sample_mask
}  // namespace tcm
