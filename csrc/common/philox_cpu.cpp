// CPU implementation of tcm::philox4x32_10 (known-answer tests of the shared generator).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "philox.h"
#include "philox_args.h"

namespace tcm {
namespace {

at::Tensor philox4x32_10_cpu(const at::Tensor& counters, int64_t seed) {
  check_philox_counters(counters);
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const auto s = static_cast<uint64_t>(seed);
  for (int64_t k = 0; k < c.size(0); ++k) {
    const int64_t* ck = in + 4 * k;
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(ck[0]), static_cast<uint32_t>(ck[1]),
                                    static_cast<uint32_t>(ck[2]), static_cast<uint32_t>(ck[3]),
                                    static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
    for (int j = 0; j < 4; ++j) o[4 * k + j] = w.x[j];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) { m.impl("philox4x32_10", &philox4x32_10_cpu); }

}  // namespace tcm
