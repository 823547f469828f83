// ATen-level description of one submanifold convolution, shared by the CPU and CUDA back ends: argument
// checks, geometry, and the weight's GEMM layout. Host only (the index math lives in submconv.h).
#pragma once

#include <ATen/ATen.h>

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

inline Problem make_problem(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight, at::IntArrayRef dilation,
                     int64_t groups) {
  TCM_CHECK_VALUE(x.dim() == 4 || x.dim() == 5, kOp, " x must be 4-D or 5-D [B, C, *S], got ", x.sizes());
  TCM_CHECK_VALUE(mask.dim() == x.dim() && mask.size(0) == x.size(0) && mask.size(1) == 1 &&
                      mask.sizes().slice(2) == x.sizes().slice(2),
                  kOp, " mask must be [B, 1, *S] matching x ", x.sizes(), ", got ", mask.sizes());
  TCM_CHECK_TYPE(mask.scalar_type() == at::kBool, kOp, " mask must be bool, got ", mask.scalar_type());
  TCM_CHECK_VALUE(weight.dim() == x.dim(), kOp, " weight must be ", x.dim(), "-D, got ", weight.sizes());
  TCM_CHECK_VALUE(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0 &&
                      weight.size(1) * groups == x.size(1),
                  kOp, " weight [Cout, Cin/groups, *k] must match Cin=", x.size(1), " and groups=", groups, ", got ",
                  weight.sizes());
  const int nd = static_cast<int>(x.dim()) - 2;
  TCM_CHECK_VALUE(static_cast<int>(dilation.size()) == nd, kOp, " dilation must have ", nd, " entries, got ",
                  dilation.size());
  for (int i = 0; i < nd; ++i) {
    TCM_CHECK_VALUE(weight.size(2 + i) % 2 == 1, kOp, " kernel size must be odd, got ", weight.sizes());
    TCM_CHECK_VALUE(dilation[i] >= 1, kOp, " dilation must be >= 1, got ", dilation);
  }
  const at::Tensor x5 = as_5d(x), w5 = as_5d(weight);
  Problem p;
  p.geo = Geometry{x5.size(0), x5.size(2), x5.size(3), x5.size(4),
                   static_cast<int32_t>(w5.size(2)), static_cast<int32_t>(w5.size(3)), static_cast<int32_t>(w5.size(4)),
                   nd == 3 ? static_cast<int32_t>(dilation[0]) : 1, static_cast<int32_t>(dilation[nd - 2]),
                   static_cast<int32_t>(dilation[nd - 1])};
  p.cin = x.size(1);
  p.cout = weight.size(0);
  p.groups = groups;
  return p;
}

// Weight [Cout, Cin/g, *k] -> fp32 wt [groups, cout_g, K * cin_g] (im2col column order: tap-major). The GEMM
// reads it transposed: moving Cout to the last dim instead would be a strided transpose costing ~10x more.
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
