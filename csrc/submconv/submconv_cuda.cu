// CUDA back end of tcm::submconv_* : kernel map, gathers and scatter as CUDA kernels over the shared index
// logic of submconv.h, GEMMs through at::mm (cuBLAS). Compile-checked in CI (no GPU on the build machine);
// the default GPU path of tcm_kernels.submanifold_conv is the Triton implicit GEMM, this one is
// backend="cuda".
//
//  1. kernel map: inclusive prefix sum of the mask (at::cumsum), then one thread per site writes
//     grid[site] = row or -1 and sites[row] = site (N is read back once to size `sites`);
//  2. gather: one thread per (row, channel) copies the masked-dense input to compact fp32 rows X [N, C];
//  3. implicit GEMM in chunks of kChunkRows rows (bounded scratch): one thread per (row, tap, channel)
//     fills the im2col block through the grid (zeros for missing neighbours), at::mm multiplies it by the
//     weight; the weight gradient accumulates G^T A per chunk with addmm_ in chunk order on one stream,
//     so it is deterministic (no float atomics anywhere);
//  4. scatter: one thread per output element writes the row's value or 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "submconv.h"
#include "submconv_problem.h"

namespace tcm {
namespace submconv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkRows = 4096;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void kernel_map_kernel(const bool* on, const int64_t* inclusive, int64_t total, int32_t* grid,
                                  int64_t* sites) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t row = inclusive[i] - 1;
  grid[i] = on[i] ? static_cast<int32_t>(row) : -1;
  if (on[i]) sites[row] = i;
}

template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* src, Geometry g, int64_t sb, int64_t sc, int64_t sz, int64_t sy,
                              int64_t sx, const int64_t* sites, int64_t n, int64_t channels, float* dst) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * channels) return;
  const int64_t r = i / channels, c = i % channels;
  const Site s = decode_site(g, sites[r]);
  dst[i] = static_cast<float>(src[s.b * sb + c * sc + s.z * sz + s.y * sy + s.x * sx]);
}

__global__ void im2col_kernel(Geometry g, const int32_t* grid, const int64_t* sites, const float* x, int64_t cin,
                              int64_t cin_g, int64_t grp, int64_t r0, int64_t rows, float* a) {
  const int64_t taps = g.kernel_volume();
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * taps * cin_g) return;
  const int64_t ci = i % cin_g, k = (i / cin_g) % taps, r = i / (cin_g * taps);
  const Site s = decode_site(g, sites[r0 + r]);
  const int32_t nb = neighbour_row(g, grid, s, static_cast<int32_t>(k));
  a[i] = nb < 0 ? 0.f : x[nb * cin + grp * cin_g + ci];
}

template <typename scalar_t>
__global__ void scatter_kernel(const float* y, const int32_t* grid, int64_t batch, int64_t channels,
                               int64_t sites_per_image, scalar_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= batch * channels * sites_per_image) return;
  const int64_t s = i % sites_per_image, c = (i / sites_per_image) % channels, b = i / (sites_per_image * channels);
  const int32_t row = grid[b * sites_per_image + s];
  out[i] = row < 0 ? scalar_t(0) : static_cast<scalar_t>(y[static_cast<int64_t>(row) * channels + c]);
}

struct KernelMap {
  at::Tensor grid, sites;
  int64_t rows() const { return sites.size(0); }
};

KernelMap build_kernel_map(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous().reshape({-1});
  const at::Tensor inclusive = at::cumsum(m, 0, at::kLong);
  const int64_t total = m.numel();
  const int64_t n = total ? inclusive[total - 1].item<int64_t>() : 0;  // host sync: N sizes `sites`
  TCM_CHECK_VALUE(n < INT32_MAX, kOp, " at most 2^31-1 active sites are supported, got ", n);
  KernelMap km{at::empty({total}, m.options().dtype(at::kInt)), at::empty({n}, m.options().dtype(at::kLong))};
  if (total) {
    kernel_map_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        m.const_data_ptr<bool>(), inclusive.const_data_ptr<int64_t>(), total, km.grid.mutable_data_ptr<int32_t>(),
        km.sites.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return km;
}

at::Tensor gather_features(const at::Tensor& t, const Problem& p, const KernelMap& km) {
  const at::Tensor t5 = as_5d(t);
  const int64_t n = km.rows(), c = t5.size(1);
  at::Tensor out = at::empty({n, c}, t.options().dtype(at::kFloat));
  if (n * c == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "submconv_gather_cuda", [&] {
    gather_kernel<scalar_t><<<blocks_for(n * c), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t5.const_data_ptr<scalar_t>(), p.geo, t5.stride(0), t5.stride(1), t5.stride(2), t5.stride(3), t5.stride(4),
        km.sites.const_data_ptr<int64_t>(), n, c, out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_features(const at::Tensor& y, const at::Tensor& like, int64_t channels, const Problem& p,
                            const KernelMap& km) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[1] = channels;
  at::Tensor out = at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "submconv_scatter_cuda", [&] {
    scatter_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.const_data_ptr<float>(), km.grid.const_data_ptr<int32_t>(), p.geo.batch, channels,
        p.geo.sites_per_image(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Calls fn(r0, rows, grp, a) with the im2col block a [rows, K * cin_g] of every chunk and group, in order.
template <typename Fn>
void for_each_im2col(const Problem& p, const KernelMap& km, const at::Tensor& x, Fn fn) {
  const int64_t n = km.rows(), row_floats = p.taps() * p.cin_g();
  at::Tensor a = at::empty({std::min(n, kChunkRows), row_floats}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, n - r0);
    for (int64_t grp = 0; grp < p.groups; ++grp) {
      im2col_kernel<<<blocks_for(rows * row_floats), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          p.geo, km.grid.const_data_ptr<int32_t>(), km.sites.const_data_ptr<int64_t>(), x.const_data_ptr<float>(),
          p.cin, p.cin_g(), grp, r0, rows, a.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fn(r0, rows, grp, a.narrow(0, 0, rows));
    }
  }
}

at::Tensor submconv_forward_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef dilation, int64_t groups,
                                 int64_t /*chunk_rows: CPU cache tuning*/) {
  check_same_device(x, mask, weight);
  const Problem p = make_problem(x, mask, weight, dilation, groups);
  TCM_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), kOp, " weight dtype must match x (", x.scalar_type(),
                 "), got ", weight.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelMap km = build_kernel_map(mask);
  const at::Tensor xs = gather_features(x, p, km);
  const at::Tensor wt = weight_to_gemm(weight, p);
  at::Tensor y = at::empty({km.rows(), p.cout}, xs.options());
  for_each_im2col(p, km, xs, [&](int64_t r0, int64_t rows, int64_t grp, const at::Tensor& a) {
    at::Tensor out = y.narrow(0, r0, rows).narrow(1, grp * p.cout_g(), p.cout_g());
    out.copy_(at::mm(a, wt[grp].t()));
  });
  if (bias.has_value() && bias->defined()) {
    TCM_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.cout, kOp, " bias must be [Cout=", p.cout, "], got ",
                    bias->sizes());
    y.add_(bias->to(at::kFloat));
  }
  return scatter_features(y, x, p.cout, p, km);
}

at::Tensor submconv_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                                     const at::Tensor& weight, at::IntArrayRef dilation, int64_t groups,
                                     int64_t /*chunk_rows*/) {
  check_same_device(x, mask, weight);
  const Problem p = make_problem(x, mask, weight, dilation, groups);
  TCM_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(0) == x.size(0) && grad_out.size(1) == p.cout &&
                      grad_out.sizes().slice(2) == x.sizes().slice(2),
                  kOp, " grad_out must be [B, Cout, *S], got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelMap km = build_kernel_map(mask);
  const at::Tensor xs = gather_features(x, p, km);
  const at::Tensor gs = gather_features(grad_out, p, km);
  at::Tensor dw = at::zeros({p.groups, p.cout_g(), p.taps() * p.cin_g()}, xs.options());
  for_each_im2col(p, km, xs, [&](int64_t r0, int64_t rows, int64_t grp, const at::Tensor& a) {
    dw[grp].addmm_(gs.narrow(0, r0, rows).narrow(1, grp * p.cout_g(), p.cout_g()).t(), a);
  });
  return gemm_to_weight(dw, p, weight);
}

std::tuple<at::Tensor, at::Tensor> submconv_kernel_map_cuda(const at::Tensor& mask) {
  TCM_CHECK_TYPE(mask.scalar_type() == at::kBool, kOp, " mask must be bool, got ", mask.scalar_type());
  const c10::cuda::CUDAGuard guard(mask.device());
  KernelMap km = build_kernel_map(mask);
  std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
  shape.erase(shape.begin() + 1);
  return {km.grid.reshape(shape), km.sites};
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CUDA, m) {
  m.impl("submconv_forward", &submconv_forward_cuda);
  m.impl("submconv_weight_grad", &submconv_weight_grad_cuda);
  m.impl("submconv_kernel_map", &submconv_kernel_map_cuda);
}

}  // namespace submconv
}  // namespace tcm
