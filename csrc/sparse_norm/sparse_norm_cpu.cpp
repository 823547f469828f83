// CPU kernels of the sparse (masked) normalizations. Layout: x [B, C, L]
// contiguous (L = prod of the spatial sizes), mask bool [B, L] shared by the C
// channels of a sample. One task per (b, c) plane (at::parallel_for); each
// reduction walks its plane in a fixed order, so results are deterministic.
//
//   masked_moments       (count [B], mean [B,C], m2 [B,C]) over active sites:
//                        chunks of kChunk sites are reduced exactly (two passes
//                        while the chunk is in L1: sum, then squared deviations
//                        from the chunk mean) and merged with Chan's formula.
//   masked_scale_shift   y = mask ? (x - center[b,c]) * scale[b,c] + shift[b,c] : 0
//                        (centring first keeps a large mean from cancelling digits)
//   masked_grad_moments  (sum dy, sum dy * (x - center[b,c])) over active sites
//   masked_norm_backward dx = mask ? dy * dy_scale + (x - center) * x_scale + shift : 0
//
// Accumulation is in at::opmath_type (float for fp16/bf16/fp32, double for fp64);
// the per-plane outputs have that dtype too. Sums inside a chunk use kLanes
// independent accumulators so the compiler can vectorize without -ffast-math.
// The bool mask is expanded once per call into all-ones / all-zero bit words and
// applied with a bitwise AND: that vectorizes (a bool select does not, GCC 12 with
// SSE2), gives +0.0 at inactive sites and ignores whatever values they hold
// (NaN/inf there never reach a sum or an output, unlike multiplying by the mask).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "sparse_norm.h"

namespace tcm {
namespace sparse_norm {
namespace {

constexpr int64_t kChunk = 512;
constexpr int kLanes = 16;

template <typename acc_t>
using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;

// v where the mask word is all ones, +0.0 where it is zero.
template <typename acc_t>
inline acc_t keep(acc_t v, bits_t<acc_t> word) {
  bits_t<acc_t> u;
  std::memcpy(&u, &v, sizeof(u));
  u &= word;
  std::memcpy(&v, &u, sizeof(u));
  return v;
}

template <typename acc_t>
std::vector<bits_t<acc_t>> mask_words(const at::Tensor& mask) {
  const bool* m = mask.const_data_ptr<bool>();
  std::vector<bits_t<acc_t>> words(mask.numel());
  for (size_t i = 0; i < words.size(); ++i) words[i] = m[i] ? ~bits_t<acc_t>(0) : bits_t<acc_t>(0);
  return words;
}

void check_x_mask(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  TCM_CHECK_VALUE(x.dim() == 3, op, "x must be 3-D [B, C, L], got shape ", x.sizes());
  TCM_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  TCM_CHECK_TYPE(mask.scalar_type() == at::kBool, op, "mask must be bool, got ", mask.scalar_type());
  TCM_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2), op,
                  "mask must be [B, L] = [", x.size(0), ", ", x.size(2), "], got shape ", mask.sizes());
}

void check_plane_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TCM_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, name, " must be [B, C] = [",
                  x.size(0), ", ", x.size(1), "], got shape ", t.sizes());
  TCM_CHECK_TYPE(t.scalar_type() == acc, op, name, " must be ", acc, ", got ", t.scalar_type());
}

int64_t grain_for(int64_t plane) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1)); }

// One lane-strided pass: lane j of acc gets f(i) for i = j (mod kLanes). The
// constant-trip inner loop over full lane groups is what the compiler vectorizes.
template <typename acc_t, typename F>
inline void lane_sum(int64_t n, acc_t (&acc)[kLanes], F f) {
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  for (int64_t i = full; i < n; ++i) acc[i - full] += f(i);
}

template <typename scalar_t, typename acc_t>
Moments<acc_t> plane_moments(const scalar_t* x, const bits_t<acc_t>* m, int64_t len) {
  Moments<acc_t> total{0, 0, 0};
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t n = std::min(kChunk, len - start);
    const scalar_t* xs = x + start;
    const bits_t<acc_t>* ms = m + start;
    acc_t cnt[kLanes] = {}, sum[kLanes] = {};
    lane_sum(n, cnt, [&](int64_t i) { return keep(acc_t(1), ms[i]); });
    lane_sum(n, sum, [&](int64_t i) { return keep(static_cast<acc_t>(xs[i]), ms[i]); });
    acc_t c = 0, s = 0;
    for (int j = 0; j < kLanes; ++j) c += cnt[j], s += sum[j];
    if (c == acc_t(0)) continue;
    const acc_t mean = s / c;
    acc_t sq[kLanes] = {};
    lane_sum(n, sq, [&](int64_t i) {
      const acc_t d = keep(static_cast<acc_t>(xs[i]) - mean, ms[i]);
      return d * d;
    });
    acc_t q = 0;
    for (int j = 0; j < kLanes; ++j) q += sq[j];
    merge_moments(total, c, mean, q);
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_moments_cpu(const at::Tensor& x_in, const at::Tensor& mask_in) {
  constexpr const char* op = "masked_moments";
  check_x_mask(op, x_in, mask_in);
  const at::Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor count = at::empty({B}, x.options().dtype(acc_type));
  at::Tensor mean = at::empty({B, C}, x.options().dtype(acc_type));
  at::Tensor m2 = at::empty({B, C}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const std::vector<bits_t<acc_t>> words = mask_words<acc_t>(mask);
    const bits_t<acc_t>* mp = words.data();
    acc_t* cp = count.mutable_data_ptr<acc_t>();
    acc_t* meanp = mean.mutable_data_ptr<acc_t>();
    acc_t* m2p = m2.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C;
        const Moments<acc_t> mo = plane_moments<scalar_t, acc_t>(xp + p * L, mp + b * L, L);
        meanp[p] = mo.mean;
        m2p[p] = mo.m2;
        if (p % C == 0) cp[b] = mo.count;  // the same for every channel of a sample
      }
    });
    if (C == 0) {
      for (int64_t b = 0; b < B; ++b) {
        int64_t n = 0;
        for (int64_t l = 0; l < L; ++l) n += mp[b * L + l] != 0;
        cp[b] = static_cast<acc_t>(n);
      }
    }
  });
  return std::make_tuple(count, mean, m2);
}

at::Tensor masked_scale_shift_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, const at::Tensor& center_in,
                                  const at::Tensor& scale_in, const at::Tensor& shift_in) {
  constexpr const char* op = "masked_scale_shift";
  check_x_mask(op, x_in, mask_in);
  check_plane_param(op, "center", center_in, x_in);
  check_plane_param(op, "scale", scale_in, x_in);
  check_plane_param(op, "shift", shift_in, x_in);
  const at::Tensor x = x_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor center = center_in.contiguous(), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const std::vector<bits_t<acc_t>> words = mask_words<acc_t>(mask);
    const bits_t<acc_t>* mp = words.data();
    const acc_t* ce = center.const_data_ptr<acc_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const bits_t<acc_t>* mk = mp + (p / C) * L;
        const scalar_t* xr = xp + p * L;
        scalar_t* yr = yp + p * L;
        const acc_t mu = ce[p], a = sc[p], s = sh[p];
        for (int64_t l = 0; l < L; ++l)
          yr[l] = static_cast<scalar_t>(keep((static_cast<acc_t>(xr[l]) - mu) * a + s, mk[l]));
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> masked_grad_moments_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                           const at::Tensor& mask_in, const at::Tensor& center_in) {
  constexpr const char* op = "masked_grad_moments";
  check_x_mask(op, x_in, mask_in);
  TCM_CHECK_VALUE(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
                  "dy must match x in shape and dtype, got ", dy_in.sizes(), " ", dy_in.scalar_type(), " vs ",
                  x_in.sizes(), " ", x_in.scalar_type());
  check_plane_param(op, "center", center_in, x_in);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor center = center_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor sum_dy = at::empty({B, C}, x.options().dtype(acc_type));
  at::Tensor sum_dy_xc = at::empty({B, C}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const std::vector<bits_t<acc_t>> words = mask_words<acc_t>(mask);
    const bits_t<acc_t>* mp = words.data();
    const acc_t* cp = center.const_data_ptr<acc_t>();
    acc_t* s1 = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* s2 = sum_dy_xc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const bits_t<acc_t>* mk = mp + (p / C) * L;
        const scalar_t* xr = xp + p * L;
        const scalar_t* gr = gp + p * L;
        const acc_t mu = cp[p];
        acc_t a[kLanes] = {}, b[kLanes] = {};
        lane_sum(L, a, [&](int64_t i) { return keep(static_cast<acc_t>(gr[i]), mk[i]); });
        lane_sum(L, b, [&](int64_t i) {
          return keep(static_cast<acc_t>(gr[i]) * (static_cast<acc_t>(xr[i]) - mu), mk[i]);
        });
        acc_t ta = 0, tb = 0;
        for (int j = 0; j < kLanes; ++j) ta += a[j], tb += b[j];
        s1[p] = ta;
        s2[p] = tb;
      }
    });
  });
  return std::make_tuple(sum_dy, sum_dy_xc);
}

at::Tensor masked_norm_backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mask_in,
                                    const at::Tensor& dy_scale_in, const at::Tensor& x_scale_in,
                                    const at::Tensor& center_in, const at::Tensor& shift_in) {
  constexpr const char* op = "masked_norm_backward";
  check_x_mask(op, x_in, mask_in);
  TCM_CHECK_VALUE(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
                  "dy must match x in shape and dtype, got ", dy_in.sizes(), " ", dy_in.scalar_type(), " vs ",
                  x_in.sizes(), " ", x_in.scalar_type());
  check_plane_param(op, "dy_scale", dy_scale_in, x_in);
  check_plane_param(op, "x_scale", x_scale_in, x_in);
  check_plane_param(op, "center", center_in, x_in);
  check_plane_param(op, "shift", shift_in, x_in);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor ga = dy_scale_in.contiguous(), xa = x_scale_in.contiguous(), ce = center_in.contiguous(),
                   sh = shift_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const std::vector<bits_t<acc_t>> words = mask_words<acc_t>(mask);
    const bits_t<acc_t>* mp = words.data();
    const acc_t *gap = ga.const_data_ptr<acc_t>(), *xap = xa.const_data_ptr<acc_t>();
    const acc_t *cep = ce.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const bits_t<acc_t>* mk = mp + (p / C) * L;
        const scalar_t* xr = xp + p * L;
        const scalar_t* gr = gp + p * L;
        scalar_t* dr = dp + p * L;
        const acc_t a = gap[p], q = xap[p], mu = cep[p], s = shp[p];
        for (int64_t l = 0; l < L; ++l)
          dr[l] = static_cast<scalar_t>(
              keep(static_cast<acc_t>(gr[l]) * a + (static_cast<acc_t>(xr[l]) - mu) * q + s, mk[l]));
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) {
  m.impl("masked_moments", &masked_moments_cpu);
  m.impl("masked_scale_shift", &masked_scale_shift_cpu);
  m.impl("masked_grad_moments", &masked_grad_moments_cpu);
  m.impl("masked_norm_backward", &masked_norm_backward_cpu);
}

}  // namespace sparse_norm
}  // namespace tcm
