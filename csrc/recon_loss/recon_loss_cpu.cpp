// CPU kernels of tcm::masked_recon_loss: one task per (sample, patch), reading
// the patch in place through its rows (no patchified copy of pred or target).
//
//   recon_loss_forward  -> per_patch [B, N] (opmath dtype):
//       t_hat = (t - mean) / sqrt(var_unbiased + eps) when norm_pix, else t
//       per_patch = mean over the patch of (pred - t_hat)^2
//   recon_loss_backward(grad_per_patch [B, N]) -> grad_pred [B, C, *S]:
//       grad_pred = grad_per_patch[b, n] * 2 / D * (pred - t_hat)
// The target statistics use two passes over the patch (sum, then squared
// deviations), which stays exact however large the patch mean is; the patch is
// in cache for the second pass and the squared-error pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/checks.h"
#include "recon_loss.h"

namespace tcm {
namespace recon_loss {
namespace {

Geometry make_geometry(const char* op, const at::Tensor& pred, const at::Tensor& target, at::IntArrayRef patch,
                       bool norm_pix) {
  TCM_CHECK_VALUE(pred.dim() == 4 || pred.dim() == 5, op, "pred must be [B, C, H, W] or [B, C, D, H, W], got shape ",
                  pred.sizes());
  TCM_CHECK_VALUE(pred.sizes() == target.sizes(), op, "target must have the shape of pred ", pred.sizes(), ", got ",
                  target.sizes());
  TCM_CHECK_TYPE(pred.scalar_type() == target.scalar_type() && at::isFloatingType(pred.scalar_type()), op,
                 "pred and target must share one floating dtype, got ", pred.scalar_type(), " and ",
                 target.scalar_type());
  const int64_t sd = pred.dim() - 2;
  TCM_CHECK_VALUE(static_cast<int64_t>(patch.size()) == sd, op, "patch_size must have ", sd, " entries, got ",
                  patch.size());
  for (int64_t i = 0; i < sd; ++i)
    TCM_CHECK_VALUE(patch[i] > 0 && pred.size(2 + i) % patch[i] == 0, op, "patch_size ", patch,
                    " must divide the spatial shape ", pred.sizes().slice(2));
  Geometry g{};
  g.C = pred.size(1);
  g.D = sd == 3 ? pred.size(2) : 1;
  g.H = pred.size(pred.dim() - 2);
  g.W = pred.size(pred.dim() - 1);
  g.pd = sd == 3 ? patch[0] : 1;
  g.ph = patch[sd - 2];
  g.pw = patch[sd - 1];
  g.gd = g.D / g.pd;
  g.gh = g.H / g.ph;
  g.gw = g.W / g.pw;
  TCM_CHECK_VALUE(!norm_pix || g.patch_elems() >= 2, op,
                  "norm_pix needs at least 2 elements per patch (unbiased variance), got ", g.patch_elems());
  return g;
}

// Target mean and 1/sqrt(var + eps) of one patch (identity when !norm_pix).
template <typename scalar_t, typename acc_t>
void patch_target_stats(const scalar_t* t, const Geometry& g, bool norm_pix, double eps, acc_t& mean, acc_t& rstd) {
  mean = 0;
  rstd = 1;
  if (!norm_pix) return;
  const int64_t rows = g.C * g.pd * g.ph;
  acc_t s = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = t + g.row_offset(r);
    acc_t rs = 0;
    for (int64_t i = 0; i < g.pw; ++i) rs += static_cast<acc_t>(row[i]);
    s += rs;
  }
  const acc_t n = static_cast<acc_t>(g.patch_elems());
  mean = s / n;
  acc_t q = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = t + g.row_offset(r);
    acc_t rq = 0;
    for (int64_t i = 0; i < g.pw; ++i) {
      const acc_t d = static_cast<acc_t>(row[i]) - mean;
      rq += d * d;
    }
    q += rq;
  }
  rstd = acc_t(1) / std::sqrt(q / (n - acc_t(1)) + static_cast<acc_t>(eps));
}

at::Tensor recon_loss_forward_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, at::IntArrayRef patch,
                                  bool norm_pix, double eps) {
  constexpr const char* op = "recon_loss_forward";
  const Geometry g = make_geometry(op, pred_in, target_in, patch, norm_pix);
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), N = g.patches(), image = g.C * g.D * g.H * g.W;
  at::Tensor per_patch = at::empty({B, N}, pred.options().dtype(at::toOpMathType(pred.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    acc_t* out = per_patch.mutable_data_ptr<acc_t>();
    const int64_t rows = g.C * g.pd * g.ph;
    at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / N, origin = b * image + g.patch_origin(k % N);
        acc_t mean, rstd;
        patch_target_stats<scalar_t, acc_t>(tp + origin, g, norm_pix, eps, mean, rstd);
        acc_t se = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t off = origin + g.row_offset(r);
          acc_t rs = 0;
          for (int64_t i = 0; i < g.pw; ++i) {
            const acc_t d = static_cast<acc_t>(pp[off + i]) - (static_cast<acc_t>(tp[off + i]) - mean) * rstd;
            rs += d * d;
          }
          se += rs;
        }
        out[k] = se / static_cast<acc_t>(g.patch_elems());
      }
    });
  });
  return per_patch;
}

at::Tensor recon_loss_backward_cpu(const at::Tensor& grad_in, const at::Tensor& pred_in, const at::Tensor& target_in,
                                   at::IntArrayRef patch, bool norm_pix, double eps) {
  constexpr const char* op = "recon_loss_backward";
  const Geometry g = make_geometry(op, pred_in, target_in, patch, norm_pix);
  const int64_t B = pred_in.size(0), N = g.patches(), image = g.C * g.D * g.H * g.W;
  const auto acc_type = at::toOpMathType(pred_in.scalar_type());
  TCM_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == N, op,
                  "grad_per_patch must be [B, N] = [", B, ", ", N, "], got shape ", grad_in.sizes());
  TCM_CHECK_TYPE(grad_in.scalar_type() == acc_type, op, "grad_per_patch must be ", acc_type, ", got ",
                 grad_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor grad_pred = at::empty_like(pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    scalar_t* out = grad_pred.mutable_data_ptr<scalar_t>();
    const int64_t rows = g.C * g.pd * g.ph;
    const acc_t two_over_n = acc_t(2) / static_cast<acc_t>(g.patch_elems());
    at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / N, origin = b * image + g.patch_origin(k % N);
        const acc_t w = gp[k] * two_over_n;
        if (w == acc_t(0)) {  // unweighted patch (visible, no per-patch gradient): skip the target statistics
          for (int64_t r = 0; r < rows; ++r) std::fill_n(out + origin + g.row_offset(r), g.pw, scalar_t(0));
          continue;
        }
        acc_t mean, rstd;
        patch_target_stats<scalar_t, acc_t>(tp + origin, g, norm_pix, eps, mean, rstd);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t off = origin + g.row_offset(r);
          for (int64_t i = 0; i < g.pw; ++i) {
            const acc_t d = static_cast<acc_t>(pp[off + i]) - (static_cast<acc_t>(tp[off + i]) - mean) * rstd;
            out[off + i] = static_cast<scalar_t>(w * d);
          }
        }
      }
    });
  });
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) {
  m.impl("recon_loss_forward", &recon_loss_forward_cpu);
  m.impl("recon_loss_backward", &recon_loss_backward_cpu);
}

}  // namespace recon_loss
}  // namespace tcm
