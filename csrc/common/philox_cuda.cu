// CUDA implementation of tcm::philox4x32_10 (known-answer tests of the shared
// generator on the device): one thread per counter.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "philox.h"
#include "philox_args.h"

namespace tcm {
namespace {

constexpr int kThreads = 256;

__global__ void philox_kernel(const int64_t* __restrict__ counters, int64_t num_counters, uint32_t k0, uint32_t k1,
                              int64_t* __restrict__ words) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= num_counters) return;
  const int64_t* c = counters + 4 * i;
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                                  static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3]), k0, k1);
  for (int j = 0; j < 4; ++j) words[4 * i + j] = w.x[j];
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counters, int64_t seed) {
  check_philox_counters(counters);
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor c = counters.contiguous();
  at::Tensor words = at::empty_like(c);
  const int64_t k = c.size(0);
  if (k == 0) return words;
  const auto s = static_cast<uint64_t>(seed);
  const auto blocks = static_cast<unsigned>((k + kThreads - 1) / kThreads);
  philox_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), k, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), words.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CUDA, m) { m.impl("philox4x32_10", &philox4x32_10_cuda); }

}  // namespace tcm
