// ATen-level description of one submanifold convolution, shared by the CPU and CUDA back ends: argument
// checks, geometry, and the weight's GEMM layout. Host only (the index math lives in submconv.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../common/checks.h"
#include "submconv.h"

namespace tcm {
namespace submconv {

inline constexpr const char* kOp = "submconv";

struct Problem {
  Geometry geo;
  int64_t cin, cout, groups;
  int64_t cin_g() const { return cin / groups; }
  int64_t cout_g() const { return cout / groups; }
  int64_t taps() const { return geo.kernel_volume(); }
};

// [B, C, *S] with S of rank 2 or 3 -> a 5-D view [B, C, D, H, W] (any strides).
inline at::Tensor as_5d(const at::Tensor& t) { return t.dim() == 4 ? t.unsqueeze(2) : t; }

// Geometry of a conv of a [B, Cin, *S] input (x_sizes) with weight [Cout, Cin/g, *k]; checks weight, groups, dilation.
inline Problem make_problem_for_shape(at::IntArrayRef x_sizes, const at::Tensor& weight, at::IntArrayRef dilation,
                                      int64_t groups) {
  const int64_t dim = static_cast<int64_t>(x_sizes.size());
  TCM_CHECK_VALUE(weight.dim() == dim, kOp, " weight must be ", dim, "-D, got ", weight.sizes());
  TCM_CHECK_VALUE(groups >= 1 && x_sizes[1] % groups == 0 && weight.size(0) % groups == 0 &&
                      weight.size(1) * groups == x_sizes[1],
                  kOp, " weight [Cout, Cin/groups, *k] must match Cin=", x_sizes[1], " and groups=", groups, ", got ",
                  weight.sizes());
  const int nd = static_cast<int>(dim) - 2;
  TCM_CHECK_VALUE(static_cast<int>(dilation.size()) == nd, kOp, " dilation must have ", nd, " entries, got ",
                  dilation.size());
  for (int i = 0; i < nd; ++i) {
    TCM_CHECK_VALUE(weight.size(2 + i) % 2 == 1, kOp, " kernel size must be odd, got ", weight.sizes());
    TCM_CHECK_VALUE(dilation[i] >= 1, kOp, " dilation must be >= 1, got ", dilation);
  }
  const int64_t depth = nd == 3 ? x_sizes[2] : 1;
  const int32_t kd = nd == 3 ? static_cast<int32_t>(weight.size(2)) : 1;
  Problem p;
  p.geo = Geometry{x_sizes[0], depth, x_sizes[dim - 2], x_sizes[dim - 1],
                   kd, static_cast<int32_t>(weight.size(dim - 2)), static_cast<int32_t>(weight.size(dim - 1)),
                   nd == 3 ? static_cast<int32_t>(dilation[0]) : 1, static_cast<int32_t>(dilation[nd - 2]),
                   static_cast<int32_t>(dilation[nd - 1])};
  p.cin = x_sizes[1];
  p.cout = weight.size(0);
  p.groups = groups;
  return p;
}

// Masked-dense layout: x [B, Cin, *S], mask bool [B, 1, *S].
inline Problem make_problem(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight, at::IntArrayRef dilation,
                     int64_t groups) {
  TCM_CHECK_VALUE(x.dim() == 4 || x.dim() == 5, kOp, " x must be 4-D or 5-D [B, C, *S], got ", x.sizes());
  TCM_CHECK_VALUE(mask.dim() == x.dim() && mask.size(0) == x.size(0) && mask.size(1) == 1 &&
                      mask.sizes().slice(2) == x.sizes().slice(2),
                  kOp, " mask must be [B, 1, *S] matching x ", x.sizes(), ", got ", mask.sizes());
  TCM_CHECK_TYPE(mask.scalar_type() == at::kBool, kOp, " mask must be bool, got ", mask.scalar_type());
  return make_problem_for_shape(x.sizes(), weight, dilation, groups);
}

// Compact layout: features [N, Cin], grid int32 [B, *S] (row of each active site or -1: it carries the
// geometry), sites int64 [N] (linear site of each row, any order), weight [Cout, Cin/g, *k] (odd k).
inline Problem make_compact_problem(const at::Tensor& features, const at::Tensor& grid, const at::Tensor& sites,
                                    const at::Tensor& weight, at::IntArrayRef dilation, int64_t groups) {
  TCM_CHECK_VALUE(features.dim() == 2, kOp, " features must be 2-D [N, Cin], got ", features.sizes());
  TCM_CHECK_VALUE(grid.dim() == 3 || grid.dim() == 4, kOp, " grid must be 3-D or 4-D [B, *S], got ", grid.sizes());
  TCM_CHECK_TYPE(grid.scalar_type() == at::kInt, kOp, " grid must be int32, got ", grid.scalar_type());
  TCM_CHECK_TYPE(sites.scalar_type() == at::kLong, kOp, " sites must be int64, got ", sites.scalar_type());
  TCM_CHECK_VALUE(sites.dim() == 1 && sites.size(0) == features.size(0), kOp, " sites must be [N=", features.size(0),
                  "], got ", sites.sizes());
  TCM_CHECK_VALUE(features.device() == grid.device() && features.device() == sites.device() &&
                      features.device() == weight.device(),
                  kOp, " tensors must be on one device, got features on ", features.device(), ", grid on ",
                  grid.device(), ", sites on ", sites.device(), ", weight on ", weight.device());
  std::vector<int64_t> x_sizes(grid.sizes().begin(), grid.sizes().end());  // the dense [B, Cin, *S] of the same geometry
  x_sizes.insert(x_sizes.begin() + 1, features.size(1));
  return make_problem_for_shape(x_sizes, weight, dilation, groups);
}

// Weight [Cout, Cin/g, *k] -> fp32 wt [groups, cout_g, K * cin_g] (im2col column order: tap-major). The GEMM
// reads it transposed: moving Cout to the last dim instead would be a strided transpose costing ~10x more.
// A weight already stored in this layout (tcm_kernels/ops/weight_layout.py hands the CPU engine such views)
// passes through reshape / permute / contiguous without a copy.
inline at::Tensor weight_to_gemm(const at::Tensor& weight, const Problem& p) {
  // detach: for 1x1 kernels the result can be a view of weight, and at::mm_out refuses outputs computed
  // from a tensor that still carries requires_grad (this kernel runs below autograd).
  return weight.detach()
      .to(at::kFloat)
      .reshape({p.groups, p.cout_g(), p.cin_g(), p.taps()})
      .permute({0, 1, 3, 2})
      .reshape({p.groups, p.cout_g(), p.taps() * p.cin_g()})
      .contiguous();
}

inline at::Tensor gemm_to_weight(const at::Tensor& wt, const Problem& p, const at::Tensor& like) {
  return wt.reshape({p.groups, p.cout_g(), p.taps(), p.cin_g()})
      .permute({0, 1, 3, 2})
      .reshape(like.sizes())
      .to(like.scalar_type())
      .contiguous();
}

inline void check_same_device(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight) {
  TCM_CHECK_VALUE(x.device() == mask.device() && x.device() == weight.device(), kOp,
                  " tensors must be on one device, got x on ", x.device(), ", mask on ", mask.device(),
                  ", weight on ", weight.device());
}

}  // namespace submconv
}  // namespace tcm
