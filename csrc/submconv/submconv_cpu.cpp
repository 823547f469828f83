// CPU engine of tcm::submconv_* (submanifold sparse convolution, 2-D and 3-D), both layouts.
//
// One engine on the compact layout: fp32 features X [N, Cin] (rows in any order), a dense int32 grid
// (row of each active site, -1 elsewhere) and sites int64 [N] (linear site of each row).
//   implicit GEMM: the rows are cut into chunks of `chunk_rows`; each chunk's im2col block A [R, K*Cin/g]
//   is gathered through the grid (zeros for missing neighbours) while it fits in cache and multiplied by
//   the weight [K*Cin/g, Cout/g] with one at::mm per group. Chunks run in parallel (at::parallel_for), the
//   GEMM inside a chunk single-threaded. Depthwise convolutions (Cin/g == 1) skip the GEMM: a direct loop
//   vectorised over channels.
// The compact ops (submconv_compact_*) call the engine directly (half inputs are upcast to fp32 rows; fp32
// input is used in place). The masked-dense ops (submconv_forward / _weight_grad) wrap it:
//   1. kernel map: the grid built by one scan of the mask (rows in ascending site order);
//   2. gather X from the masked-dense input;
//   3. the engine;
//   4. scatter the compact output back to the dense [B, Cout, *S] tensor (zeros at inactive sites).
// The input gradient is the engine applied to grad_out with the flipped, in/out-transposed kernel (the
// neighbour relation is symmetric), so it needs no atomics. The weight gradient sums A^T G over chunks in
// a fixed number of partitions that depends only on the shapes, then adds the partitions in order:
// deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "submconv.h"
#include "submconv_problem.h"

namespace tcm {
namespace submconv {
namespace {

constexpr int64_t kChannelBlock = 16;  // channels per task of the layout transposes: one cache line of fp32

struct KernelMap {
  at::Tensor grid;   // int32 [B * D * H * W] (contiguous): row of the active site or -1
  at::Tensor sites;  // int64 [N] (contiguous): linear site index of each row (ascending when built from a mask)
  int64_t rows() const { return sites.size(0); }
};

KernelMap build_kernel_map(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const int64_t total = m.numel();
  const bool* on = m.const_data_ptr<bool>();
  KernelMap km;
  km.grid = at::empty({total}, m.options().dtype(at::kInt));
  int32_t* grid = km.grid.mutable_data_ptr<int32_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < total; ++i) grid[i] = on[i] ? static_cast<int32_t>(n++) : -1;
  TCM_CHECK_VALUE(n < INT32_MAX, kOp, " at most 2^31-1 active sites are supported, got ", n);
  km.sites = at::empty({n}, m.options().dtype(at::kLong));
  int64_t* sites = km.sites.mutable_data_ptr<int64_t>();
  at::parallel_for(0, total, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      if (grid[i] >= 0) sites[grid[i]] = i;
  });
  return km;
}

// Both layout transposes below work on one image and a block of kChannelBlock channels per task: every
// compact row touched is one cache line, and the kChannelBlock channel planes are streamed in site order.

// First row of each image (+ the total at the end): rows built from a mask are sorted by site, so images are
// contiguous. Only the masked-dense gather relies on it; the engine takes rows in any order.
std::vector<int64_t> image_row_starts(const KernelMap& km, int64_t batch, int64_t sites_per_image) {
  const int64_t* sites = km.sites.const_data_ptr<int64_t>();
  std::vector<int64_t> starts(batch + 1);
  for (int64_t b = 0; b <= batch; ++b)
    starts[b] = std::lower_bound(sites, sites + km.rows(), b * sites_per_image) - sites;
  return starts;
}

// Compact fp32 features X [N, C] of the masked-dense t [B, C, *S] (any strides).
at::Tensor gather_features(const at::Tensor& t, const Problem& p, const KernelMap& km) {
  const at::Tensor t5 = as_5d(t);
  const int64_t n = km.rows(), c = t5.size(1), batch = p.geo.batch, sites_per_image = p.geo.sites_per_image();
  at::Tensor out = at::empty({n, c}, t.options().dtype(at::kFloat));
  const int64_t sb = t5.stride(0), sc = t5.stride(1), sz = t5.stride(2), sy = t5.stride(3), sx = t5.stride(4);
  const int64_t* sites = km.sites.const_data_ptr<int64_t>();
  const std::vector<int64_t> starts = image_row_starts(km, batch, sites_per_image);
  const int64_t blocks = (c + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "submconv_gather", [&] {
    const scalar_t* src = t5.const_data_ptr<scalar_t>();
    float* dst = out.mutable_data_ptr<float>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock, cn = std::min(kChannelBlock, c - c0);
        const scalar_t* image = src + b * sb + c0 * sc;
        for (int64_t r = starts[b]; r < starts[b + 1]; ++r) {
          const Site s = decode_site(p.geo, sites[r]);
          const scalar_t* at = image + s.z * sz + s.y * sy + s.x * sx;
          float* row = dst + r * c + c0;
          for (int64_t j = 0; j < cn; ++j) row[j] = static_cast<float>(at[j * sc]);
        }
      }
    });
  });
  return out;
}

// Dense [B, C, *S] (contiguous, dtype of `like`) holding the compact rows Y [N, C], zeros elsewhere; each
// output plane is written once, in order (no separate zero fill).
at::Tensor scatter_features(const at::Tensor& y, const at::Tensor& like, int64_t channels, const Problem& p,
                            const KernelMap& km) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[1] = channels;
  at::Tensor out = at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t sites_per_image = p.geo.sites_per_image();
  const int32_t* grid = km.grid.const_data_ptr<int32_t>();
  const float* src = y.const_data_ptr<float>();
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "submconv_scatter", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.geo.batch * blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock;
        const int64_t cn = std::min(kChannelBlock, channels - c0);
        const int32_t* rows = grid + b * sites_per_image;
        scalar_t* planes = dst + (b * channels + c0) * sites_per_image;
        for (int64_t s = 0; s < sites_per_image; ++s) {
          if (rows[s] < 0) {
            for (int64_t j = 0; j < cn; ++j) planes[j * sites_per_image + s] = scalar_t(0);
          } else {
            const float* row = src + static_cast<int64_t>(rows[s]) * channels + c0;
            for (int64_t j = 0; j < cn; ++j) planes[j * sites_per_image + s] = static_cast<scalar_t>(row[j]);
          }
        }
      }
    });
  });
  return out;
}

// Rows per implicit-GEMM chunk. Measured on a 2-core AVX-512 machine (ResNet-50 stage shapes, see
// docs/submconv.md): below ~256 rows the GEMM streams the weight once per few rows and loses up to 2x; above
// ~512 the im2col block of small-C layers leaves L2. A shape-only rule: the weight-gradient partitions, which
// must not depend on the thread count, use it as is.
int64_t pick_chunk_rows(int64_t requested, int64_t row_floats) {
  if (requested > 0) return requested;
  const int64_t rows = (int64_t{1} << 20) / (4 * std::max<int64_t>(row_floats, 1));
  return std::clamp<int64_t>(rows / 64 * 64, 256, 512);
}

// Forward chunks may also shrink so every thread gets work on small layers (no reduction across chunks).
int64_t balance_chunk_rows(int64_t chunk, int64_t rows_total, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t per_task = (rows_total + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::clamp<int64_t>((per_task + 15) / 16 * 16, 64, chunk);
}

// Tap displacements, computed once per call rather than per (row, tap): the divisions cost ~10 % of a 3x3 C64 layer.
std::vector<Offset> tap_offsets(const Geometry& g) {
  std::vector<Offset> out(g.kernel_volume());
  for (int32_t k = 0; k < g.kernel_volume(); ++k) out[k] = tap_offset(g, k);
  return out;
}

// A [rows, K * cin_g] im2col block of group `grp` for rows [r0, r0 + rows).
void fill_im2col(const Problem& p, const int32_t* grid, const int64_t* sites, const Offset* offsets, const float* x,
                 int64_t r0, int64_t rows, int64_t grp, float* a) {
  const int64_t cin_g = p.cin_g(), taps = p.taps();
  for (int64_t r = 0; r < rows; ++r) {
    const Site s = decode_site(p.geo, sites[r0 + r]);
    float* dst = a + r * taps * cin_g;
    for (int32_t k = 0; k < taps; ++k, dst += cin_g) {
      const int32_t nb = neighbour_row(p.geo, grid, s, offsets[k]);
      if (nb < 0) {
        std::fill(dst, dst + cin_g, 0.f);
      } else {
        const float* src = x + nb * p.cin + grp * cin_g;
        std::copy(src, src + cin_g, dst);
      }
    }
  }
}

// Y [N, Cout] = submanifold conv of X [N, Cin] with wt [groups, cout_g, K * cin_g] (+ bias [Cout]).
at::Tensor conv_rows(const Problem& p, const KernelMap& km, const at::Tensor& x, const at::Tensor& wt,
                     const float* bias, int64_t chunk_rows) {
  const int64_t n = km.rows(), taps = p.taps(), cin_g = p.cin_g(), cout_g = p.cout_g(), cout = p.cout;
  at::Tensor y = at::empty({n, cout}, x.options());
  const int32_t* grid = km.grid.const_data_ptr<int32_t>();
  const int64_t* sites = km.sites.const_data_ptr<int64_t>();
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  if (n == 0) return y;
  const std::vector<Offset> offsets = tap_offsets(p.geo);

  if (cin_g == 1) {  // depthwise (channel multiplier m = cout_g): direct loop, wd [K, Cout]
    const at::Tensor wd = wt.reshape({cout, taps}).t().contiguous();  // [K, Cout]
    const float* w = wd.const_data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        float* acc = yp + r * cout;
        for (int64_t co = 0; co < cout; ++co) acc[co] = bias ? bias[co] : 0.f;
        const Site s = decode_site(p.geo, sites[r]);
        for (int32_t k = 0; k < taps; ++k) {
          const int32_t nb = neighbour_row(p.geo, grid, s, offsets[k]);
          if (nb < 0) continue;
          const float* xr = xp + nb * p.cin;
          const float* wk = w + k * cout;
          if (cout_g == 1) {
            for (int64_t co = 0; co < cout; ++co) acc[co] += xr[co] * wk[co];
          } else {
            for (int64_t co = 0; co < cout; ++co) acc[co] += xr[co / cout_g] * wk[co];
          }
        }
      }
    });
    return y;
  }

  const int64_t row_floats = taps * cin_g;
  const int64_t chunk = balance_chunk_rows(pick_chunk_rows(chunk_rows, row_floats), n, chunk_rows);
  const int64_t chunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor a = at::empty({chunk, row_floats}, x.options());
    at::Tensor c = p.groups > 1 ? at::empty({chunk, cout_g}, x.options()) : at::Tensor();
    for (int64_t ci = lo; ci < hi; ++ci) {
      const int64_t r0 = ci * chunk, rows = std::min(chunk, n - r0);
      at::Tensor a_rows = a.narrow(0, 0, rows);
      for (int64_t grp = 0; grp < p.groups; ++grp) {
        fill_im2col(p, grid, sites, offsets.data(), xp, r0, rows, grp, a.mutable_data_ptr<float>());
        if (p.groups == 1) {
          at::Tensor out = y.narrow(0, r0, rows);
          at::mm_out(out, a_rows, wt[0].t());
        } else {
          at::Tensor out = c.narrow(0, 0, rows);
          at::mm_out(out, a_rows, wt[grp].t());
          const float* cp = c.const_data_ptr<float>();
          for (int64_t r = 0; r < rows; ++r)
            std::copy(cp + r * cout_g, cp + (r + 1) * cout_g, yp + (r0 + r) * cout + grp * cout_g);
        }
      }
      if (bias) {
        for (int64_t r = r0; r < r0 + rows; ++r)
          for (int64_t co = 0; co < cout; ++co) yp[r * cout + co] += bias[co];
      }
    }
  });
  return y;
}

// dW in GEMM layout [groups, cout_g, K * cin_g] from X [N, Cin] and G [N, Cout].
at::Tensor weight_grad_rows(const Problem& p, const KernelMap& km, const at::Tensor& x, const at::Tensor& g,
                            int64_t chunk_rows) {
  const int64_t n = km.rows(), taps = p.taps(), cin_g = p.cin_g(), cout_g = p.cout_g(), cout = p.cout;
  const int64_t row_floats = taps * cin_g;
  const int32_t* grid = km.grid.const_data_ptr<int32_t>();
  const int64_t* sites = km.sites.const_data_ptr<int64_t>();
  const float* xp = x.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const std::vector<Offset> offsets = tap_offsets(p.geo);
  const int64_t chunk = pick_chunk_rows(chunk_rows, row_floats);
  const int64_t chunks = std::max<int64_t>((n + chunk - 1) / chunk, 1);
  // Fixed partition count (shape-dependent only) => the same summation order on any thread count.
  const int64_t partial_floats = p.groups * row_floats * cout_g;
  const int64_t parts = std::clamp<int64_t>((int64_t{64} << 20) / 4 / std::max<int64_t>(partial_floats, 1), 1,
                                            std::min<int64_t>(chunks, 8));
  // Each partition's first chunk overwrites its slice (beta = 0), so no zero fill: at the deep stages of a 3-D
  // encoder a partition is as large as the weight and the fill cost as much as the GEMM of the few rows.
  at::Tensor partial = at::empty({parts, p.groups, cout_g, row_floats}, x.options());
  const int64_t chunks_per_part = (chunks + parts - 1) / parts;
  at::parallel_for(0, parts, 1, [&](int64_t plo, int64_t phi) {
    at::Tensor a = at::empty({chunk, row_floats}, x.options());
    for (int64_t part = plo; part < phi; ++part) {
      float* dw = partial[part].mutable_data_ptr<float>();
      bool first = true;  // no chunk written to this partition yet
      for (int64_t ci = part * chunks_per_part; ci < std::min(chunks, (part + 1) * chunks_per_part); ++ci) {
        const int64_t r0 = ci * chunk, rows = std::min(chunk, n - r0);
        if (rows <= 0) break;
        if (first && cin_g == 1) std::fill(dw, dw + partial_floats, 0.f);  // the depthwise loop accumulates
        if (cin_g == 1) {  // depthwise: dW[co, k] += G[r, co] * X[nb(r, k), co / cout_g]
          for (int64_t r = r0; r < r0 + rows; ++r) {
            const Site s = decode_site(p.geo, sites[r]);
            const float* gr = gp + r * cout;
            for (int32_t k = 0; k < taps; ++k) {
              const int32_t nb = neighbour_row(p.geo, grid, s, offsets[k]);
              if (nb < 0) continue;
              const float* xr = xp + nb * p.cin;
              // GEMM layout [groups, cout_g, K] is [Cout, K] here.
              for (int64_t co = 0; co < cout; ++co) dw[co * taps + k] += gr[co] * xr[co / cout_g];
            }
          }
          first = false;
          continue;
        }
        at::Tensor a_rows = a.narrow(0, 0, rows);
        // detach: under create_graph grad_out requires grad, and at::mm_out refuses such inputs (this kernel
        // runs below the op's autograd).
        at::Tensor g_rows = g.detach().narrow(0, r0, rows);
        for (int64_t grp = 0; grp < p.groups; ++grp) {
          fill_im2col(p, grid, sites, offsets.data(), xp, r0, rows, grp, a.mutable_data_ptr<float>());
          at::Tensor dst = partial[part][grp];
          if (first) {
            at::mm_out(dst, g_rows.narrow(1, grp * cout_g, cout_g).t(), a_rows);
          } else {
            dst.addmm_(g_rows.narrow(1, grp * cout_g, cout_g).t(), a_rows);
          }
        }
        first = false;
      }
      if (first) std::fill(dw, dw + partial_floats, 0.f);  // a partition without rows (n == 0)
    }
  });
  at::Tensor total = partial[0];  // partials are added in order: deterministic on any thread count
  for (int64_t part = 1; part < parts; ++part) total.add_(partial[part]);
  return total;
}

// fp32 copy of the optional bias [Cout] (undefined when absent).
at::Tensor bias_fp32(const std::optional<at::Tensor>& bias, const Problem& p) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TCM_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.cout, kOp, " bias must be [Cout=", p.cout, "], got ",
                  bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

// Y fp32 [N, Cout]: the engine on fp32 rows X [N, Cin].
at::Tensor engine_forward(const Problem& p, const KernelMap& km, const at::Tensor& x32, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t chunk_rows) {
  const at::Tensor b32 = bias_fp32(bias, p);
  return conv_rows(p, km, x32, weight_to_gemm(weight, p), b32.defined() ? b32.const_data_ptr<float>() : nullptr,
                   chunk_rows);
}

at::Tensor submconv_forward_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef dilation, int64_t groups,
                                int64_t chunk_rows) {
  check_same_device(x, mask, weight);
  const Problem p = make_problem(x, mask, weight, dilation, groups);
  TCM_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), kOp, " weight dtype must match x (", x.scalar_type(),
                 "), got ", weight.scalar_type());
  const KernelMap km = build_kernel_map(mask);
  const at::Tensor y = engine_forward(p, km, gather_features(x, p, km), weight, bias, chunk_rows);
  return scatter_features(y, x, p.cout, p, km);
}

at::Tensor submconv_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                                    const at::Tensor& weight, at::IntArrayRef dilation, int64_t groups,
                                    int64_t chunk_rows) {
  check_same_device(x, mask, weight);
  const Problem p = make_problem(x, mask, weight, dilation, groups);
  TCM_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.size(0) == x.size(0) && grad_out.size(1) == p.cout &&
                      grad_out.sizes().slice(2) == x.sizes().slice(2),
                  kOp, " grad_out must be [B, Cout, *S], got ", grad_out.sizes());
  const KernelMap km = build_kernel_map(mask);
  const at::Tensor xs = gather_features(x, p, km);
  const at::Tensor gs = gather_features(grad_out, p, km);
  return gemm_to_weight(weight_grad_rows(p, km, xs, gs, chunk_rows), p, weight);
}

// The engine reads features[grid[...]] and grid[sites[...]]: bound both before trusting a caller's map
// (one pass over grid and sites; whether grid[sites[r]] == r is the caller's contract, see the Python op).
KernelMap checked_compact_map(const at::Tensor& grid, const at::Tensor& sites) {
  KernelMap km{grid.contiguous().reshape({-1}), sites.contiguous()};
  const int64_t n = km.rows(), total = km.grid.numel();
  TCM_CHECK_VALUE(n < INT32_MAX, kOp, " at most 2^31-1 rows are supported, got ", n);
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(km.sites);
    TCM_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < total, kOp,
                    " sites must be linear sites in [0, B*prod(S)=", total, "), got values in [", lo.item<int64_t>(),
                    ", ", hi.item<int64_t>(), "]");
  }
  if (total > 0) {
    const int64_t top = km.grid.max().item<int64_t>();
    TCM_CHECK_VALUE(top < n, kOp, " grid must hold rows < N=", n, " (or -1), got a max of ", top);
  }
  return km;
}

at::Tensor submconv_compact_forward_cpu(const at::Tensor& features, const at::Tensor& grid, const at::Tensor& sites,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        at::IntArrayRef dilation, int64_t groups, int64_t chunk_rows) {
  const Problem p = make_compact_problem(features, grid, sites, weight, dilation, groups);
  TCM_CHECK_TYPE(weight.scalar_type() == features.scalar_type(), kOp, " weight dtype must match features (",
                 features.scalar_type(), "), got ", weight.scalar_type());
  const KernelMap km = checked_compact_map(grid, sites);
  // fp32 contiguous features are used in place; half types are upcast once (fp32 accumulation).
  const at::Tensor x32 = features.to(at::kFloat).contiguous();
  return engine_forward(p, km, x32, weight, bias, chunk_rows).to(features.scalar_type());
}

at::Tensor submconv_compact_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& features,
                                            const at::Tensor& grid, const at::Tensor& sites, const at::Tensor& weight,
                                            at::IntArrayRef dilation, int64_t groups, int64_t chunk_rows) {
  const Problem p = make_compact_problem(features, grid, sites, weight, dilation, groups);
  TCM_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == features.size(0) && grad_out.size(1) == p.cout, kOp,
                  " grad_out must be [N=", features.size(0), ", Cout=", p.cout, "], got ", grad_out.sizes());
  const KernelMap km = checked_compact_map(grid, sites);
  const at::Tensor x32 = features.to(at::kFloat).contiguous();
  const at::Tensor g32 = grad_out.to(at::kFloat).contiguous();
  return gemm_to_weight(weight_grad_rows(p, km, x32, g32, chunk_rows), p, weight);
}

// (grid int32 [B, *S], rows): exposed so tests and benchmarks can time the kernel-map build alone.
std::tuple<at::Tensor, at::Tensor> submconv_kernel_map_cpu(const at::Tensor& mask) {
  TCM_CHECK_TYPE(mask.scalar_type() == at::kBool, kOp, " mask must be bool, got ", mask.scalar_type());
  KernelMap km = build_kernel_map(mask);
  std::vector<int64_t> shape(mask.sizes().begin(), mask.sizes().end());
  shape.erase(shape.begin() + 1);
  return {km.grid.reshape(shape), km.sites};
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) {
  m.impl("submconv_forward", &submconv_forward_cpu);
  m.impl("submconv_weight_grad", &submconv_weight_grad_cpu);
  m.impl("submconv_kernel_map", &submconv_kernel_map_cpu);
  m.impl("submconv_compact_forward", &submconv_compact_forward_cpu);
  m.impl("submconv_compact_weight_grad", &submconv_compact_weight_grad_cpu);
}

}  // namespace submconv
}  // namespace tcm
