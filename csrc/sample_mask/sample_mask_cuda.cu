// CUDA back end of tcm::sample_mask: one block of kThreads threads per row.
//
// Per row:
//  1. keys: every thread fills the 64-bit keys of patches tid, tid + kThreads, ...
//     with the shared host-device recipe (sample_mask.h), into dynamic shared memory
//     when the row fits (N <= kMaxSharedKeys), else into a global scratch row;
//  2. selection of the k smallest (key, patch): MSB-first radix select, 8 bits per
//     pass (4 passes for 32-bit keys, 8 for 64-bit ones). A pass builds a 256-bin
//     shared histogram of the candidates' next digit with integer atomics (order-free,
//     hence deterministic) and one block scan over the bins finds the digit holding
//     the k-th smallest. The final threshold key is then exact; keys below it are
//     masked, and keys equal to it are masked in patch order (a block scan over
//     patch chunks) until k are masked, so ties go to the lower index as on the CPU;
//  3. outputs: one chunked block scan of `visible` gives each kept patch its slot in
//     ids_keep and each patch its ids_restore entry (no sort).
// Same (seed, offset) => the same mask as the CPU kernel and the Triton kernel, bit
// for bit: the keys come from the same TCM_HOST_DEVICE functions, built with
// --fmad=false, and the rest is integer logic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <tuple>

#include "sample_mask_params.h"

namespace tcm {
namespace sample_mask {
namespace {

constexpr int kThreads = 256;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
static_assert(kBins == kThreads, "the digit scan gives one histogram bin to each thread");
// 4096 keys = 32 KiB of dynamic shared memory, under the 48 KiB available without opt-in.
constexpr int kMaxSharedKeys = 4096;

using BlockScan = cub::BlockScan<int, kThreads>;
using BlockReduce = cub::BlockReduce<int, kThreads>;

struct SharedState {
  union {
    typename BlockScan::TempStorage scan;
    typename BlockReduce::TempStorage reduce;
  } temp;
  int histogram[kBins];
  int digit;  // broadcast of the digit that holds the k-th smallest key
  int rank;   // and the k-th smallest's rank among the keys sharing the prefix so far
  int count;  // broadcast of a block reduction
};

// Masks (visible[i] = false) the k smallest (keys[i], i) over the patches with active(i).
// k must be block-uniform and at most the number of active patches; keys[i] < 2^key_bits.
template <typename Active>
__device__ void mask_smallest(const uint64_t* keys, int n, int key_bits, int k, Active active, bool* visible,
                              SharedState& sh) {
  if (k <= 0) return;
  uint64_t prefix = 0, prefix_mask = 0;
  int rank = k;
  for (int shift = key_bits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    sh.histogram[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const uint64_t key = keys[i];
      if ((key & prefix_mask) == prefix && active(i)) atomicAdd(&sh.histogram[(key >> shift) & (kBins - 1)], 1);
    }
    __syncthreads();
    const int count = sh.histogram[threadIdx.x];
    int before;
    BlockScan(sh.temp.scan).ExclusiveSum(count, before);
    if (before < rank && rank <= before + count) {  // exactly one thread: the k-th smallest's digit
      sh.digit = threadIdx.x;
      sh.rank = rank - before;
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sh.digit) << shift;
    prefix_mask |= static_cast<uint64_t>(kBins - 1) << shift;
    rank = sh.rank;
    __syncthreads();  // everyone has read digit/rank before the next pass rewrites them
  }
  // prefix is the k-th smallest key; the first `rank` patches holding it are masked.
  int ties_before_chunk = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    bool below = false, tie = false;
    if (i < n && active(i)) {
      below = keys[i] < prefix;
      tie = keys[i] == prefix;
    }
    int tie_rank, ties_in_chunk;
    BlockScan(sh.temp.scan).ExclusiveSum(static_cast<int>(tie), tie_rank, ties_in_chunk);
    if (below || (tie && ties_before_chunk + tie_rank < rank)) visible[i] = false;
    ties_before_chunk += ties_in_chunk;
    __syncthreads();  // temp storage is reused by the next chunk's scan
  }
  __syncthreads();  // visible is complete for every thread before the caller reads it
}

// Sum of `value` over the block, returned to every thread.
__device__ int block_sum(int value, SharedState& sh) {
  const int total = BlockReduce(sh.temp.reduce).Sum(value);
  if (threadIdx.x == 0) sh.count = total;
  __syncthreads();
  const int sum = sh.count;
  __syncthreads();  // sh.count and the temp storage may be reused right after
  return sum;
}

__global__ void __launch_bounds__(kThreads)
    sample_mask_kernel(const float* __restrict__ scores, int n, int num_masked, int num_hard, Params p,
                       uint64_t* key_scratch, bool* __restrict__ visible, int64_t* __restrict__ ids_keep,
                       int64_t* __restrict__ ids_restore) {
  extern __shared__ uint64_t shared_keys[];
  __shared__ SharedState sh;
  const uint32_t row = blockIdx.x;
  const float* s = scores + static_cast<int64_t>(row) * n;
  bool* vis = visible + static_cast<int64_t>(row) * n;
  uint64_t* keys = key_scratch != nullptr ? key_scratch + static_cast<int64_t>(row) * n : shared_keys;
  const auto everyone = [](int) { return true; };

  for (int i = threadIdx.x; i < n; i += kThreads) vis[i] = true;
  switch (p.strategy) {
    case kUniform:
      for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = patch_words(p.seed, p.offset, row, i).x[0];
      __syncthreads();
      mask_smallest(keys, n, 32, num_masked, everyone, vis, sh);
      break;
    case kWeighted:
      for (int i = threadIdx.x; i < n; i += kThreads)
        keys[i] = weighted_key(s[i], p.inv_temperature, patch_words(p.seed, p.offset, row, i));
      __syncthreads();
      mask_smallest(keys, n, 64, num_masked, everyone, vis, sh);
      break;
    case kStratified: {
      int my_roi = 0;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        keys[i] = patch_words(p.seed, p.offset, row, i).x[0];
        my_roi += s[i] >= p.roi_threshold;
      }
      const int n_roi = block_sum(my_roi, sh);  // its barrier also publishes the keys
      const int m_roi = static_cast<int>(stratified_roi_budget(n, n_roi, num_masked, p.roi_mask_ratio));
      const float threshold = p.roi_threshold;
      mask_smallest(keys, n, 32, m_roi, [=](int i) { return s[i] >= threshold; }, vis, sh);
      mask_smallest(keys, n, 32, num_masked - m_roi, [=](int i) { return !(s[i] >= threshold); }, vis,
                    sh);
      break;
    }
    case kHardest:
      for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = hardest_score_key(s[i]);
      __syncthreads();
      mask_smallest(keys, n, 32, num_hard, everyone, vis, sh);
      for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = patch_words(p.seed, p.offset, row, i).x[0];
      __syncthreads();
      mask_smallest(keys, n, 32, num_masked - num_hard, [=](int i) { return vis[i]; }, vis, sh);
      break;
  }
  __syncthreads();

  // Kept patches before i give its slot: ids_keep[slot] = i, ids_restore[i] = slot;
  // a masked patch goes to n_keep + (masked patches before it).
  const int n_keep = n - num_masked;
  int kept_before_chunk = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    const bool kept = i < n && vis[i];
    int kept_rank, kept_in_chunk;
    BlockScan(sh.temp.scan).ExclusiveSum(static_cast<int>(kept), kept_rank, kept_in_chunk);
    const int kept_before = kept_before_chunk + kept_rank;
    if (i < n) {
      if (kept) ids_keep[static_cast<int64_t>(row) * n_keep + kept_before] = i;
      ids_restore[static_cast<int64_t>(row) * n + i] = kept ? kept_before : n_keep + (i - kept_before);
    }
    kept_before_chunk += kept_in_chunk;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_mask_cuda(const at::Tensor& scores, int64_t num_masked,
                                                                c10::string_view strategy, int64_t seed,
                                                                int64_t offset, double temperature,
                                                                double roi_threshold, double roi_mask_ratio,
                                                                double hard_fraction) {
  const Params p = make_params(scores, num_masked, strategy, seed, offset, temperature, roi_threshold, roi_mask_ratio,
                               hard_fraction);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t b = scores.size(0), n = scores.size(1);
  const at::Tensor s = scores.contiguous();
  auto visible = at::empty({b, n}, s.options().dtype(at::kBool));
  auto ids_keep = at::empty({b, n - num_masked}, s.options().dtype(at::kLong));
  auto ids_restore = at::empty({b, n}, s.options().dtype(at::kLong));
  if (b == 0 || n == 0) return std::make_tuple(visible, ids_keep, ids_restore);

  const bool keys_in_shared = n <= kMaxSharedKeys;
  at::Tensor scratch;  // keys of rows too long for shared memory
  if (!keys_in_shared) scratch = at::empty({b, n}, s.options().dtype(at::kLong));
  const size_t shared_bytes = keys_in_shared ? static_cast<size_t>(n) * sizeof(uint64_t) : 0;
  const int num_hard = static_cast<int>(hardest_budget(num_masked, p.hard_fraction));
  sample_mask_kernel<<<static_cast<unsigned>(b), kThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<float>(), static_cast<int>(n), static_cast<int>(num_masked), num_hard, p,
      keys_in_shared ? nullptr : reinterpret_cast<uint64_t*>(scratch.data_ptr<int64_t>()), visible.data_ptr<bool>(),
      ids_keep.data_ptr<int64_t>(), ids_restore.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(visible, ids_keep, ids_restore);
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CUDA, m) { m.impl("sample_mask", &sample_mask_cuda); }

}  // namespace sample_mask
}  // namespace tcm
