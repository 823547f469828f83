// Argument checks of tcm::philox4x32_10, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace tcm {

inline void check_philox_counters(const at::Tensor& counters) {
  TCM_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4, "philox4x32_10", "counters must be [K, 4], got ",
                  counters.sizes());
  TCM_CHECK_TYPE(counters.scalar_type() == at::kLong, "philox4x32_10", "counters must be int64, got ",
                 counters.scalar_type());
}

}  // namespace tcm
