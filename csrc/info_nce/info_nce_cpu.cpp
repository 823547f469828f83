// CPU back end of the tiled InfoNCE log-sum-exp (tcm::info_nce_lse) and its
// backward (tcm::info_nce_lse_backward).
//
// Logits S = inv_t * x y^T, x [M, D], y [N, D], are never materialised: tiles of
// `block` x `block` are computed with one at::mm each (MKL/oneDNN GEMM,
// single-threaded inside our parallel region) and folded into running row (and
// optionally column) log-sum-exp statistics. The backward recomputes each tile,
// forms its gradient tile G = g_row * softmax_row + g_col * softmax_col and adds
// G y, G^T x and <G, S> into the gradients. Tasks follow the conflict-free
// schedule of info_nce.h, so there are no atomics, no per-thread copies and the
// summation order is fixed. Memory: O((M + N) D) for fp32 copies of the inputs
// and O(threads * block^2) of per-thread tile buffers. Accumulation is fp32 (fp64 for fp64 input).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "info_nce.h"

namespace tcm {
namespace info_nce {
namespace {

constexpr const char* kOp = "info_nce_lse";

at::ScalarType accumulate_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double check_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_t, int64_t block) {
  TCM_CHECK_VALUE(x.dim() == 2 && y.dim() == 2, kOp, "x and y must be 2-D [B, D], got shapes ", x.sizes(), " and ",
                  y.sizes());
  TCM_CHECK_VALUE(x.size(1) == y.size(1), kOp, "x and y must have the same feature size D, got ", x.size(1), " and ",
                  y.size(1));
  TCM_CHECK_VALUE(x.size(0) >= 1 && y.size(0) >= 1, kOp, "x and y must have at least one row, got shapes ", x.sizes(),
                  " and ", y.sizes());
  TCM_CHECK_TYPE(x.scalar_type() == y.scalar_type(), kOp, "x and y must have the same dtype, got ", x.scalar_type(),
                 " and ", y.scalar_type());
  const auto dt = x.scalar_type();
  TCM_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, kOp,
                 "x must be float32, float16, bfloat16 or float64, got ", dt);
  TCM_CHECK_VALUE(inv_t.numel() == 1, kOp, "inv_t must hold one value, got shape ", inv_t.sizes());
  TCM_CHECK_VALUE(block >= 1, kOp, "block must be >= 1, got ", block);
  const double s = inv_t.item<double>();
  TCM_CHECK_VALUE(s > 0 && std::isfinite(s), kOp, "inv_t must be finite and > 0, got ", s);
  return s;
}

// Running log-sum-exp of a set of rows: lse = m + log(l).
struct RunningLse {
  at::Tensor m, l;
  RunningLse(int64_t n, at::ScalarType dt)
      : m(at::full({n}, -std::numeric_limits<double>::infinity(), at::TensorOptions().dtype(dt))),
        l(at::zeros({n}, at::TensorOptions().dtype(dt))) {}
  // Fold in partial sums `sums` taken relative to `offset` (0-dim or same shape), entries [begin, begin + len).
  void merge(int64_t begin, int64_t len, const at::Tensor& offset, const at::Tensor& sums) {
    at::Tensor m_view = m.narrow(0, begin, len), l_view = l.narrow(0, begin, len);
    const at::Tensor m_new = at::maximum(m_view, offset);
    l_view.mul_((m_view - m_new).exp_()).add_(sums * (offset - m_new).exp_());
    m_view.copy_(m_new);
  }
  at::Tensor finish() const { return m + l.log(); }
};

// Rows [begin, begin + len) of a [n, D] tensor (a contiguous view).
at::Tensor rows(const at::Tensor& t, int64_t begin, int64_t len) { return t.narrow(0, begin, len); }

int64_t tiles(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Per-thread tile buffers, allocated once per call: allocating fresh tiles for every
// pair made the allocator's retained memory grow with the number of tiles (B^2).
struct Workspace {
  std::vector<at::Tensor> buffers;  // [threads * count] flat buffers of block^2 entries
  int64_t count;
  Workspace(int64_t count, int64_t block, at::ScalarType dt) : count(count) {
    for (int64_t i = 0; i < at::get_num_threads() * count; ++i)
      buffers.push_back(at::empty({block * block}, at::TensorOptions().dtype(dt)));
  }
  // Buffer k of the calling thread as a contiguous [rows, cols] tile.
  at::Tensor tile(int64_t k, int64_t rows, int64_t cols) const {
    return buffers[at::get_thread_num() * count + k].narrow(0, 0, rows * cols).view({rows, cols});
  }
};

template <typename TaskFn>
void for_each_tile_pair(int64_t n_row, int64_t n_col, const TaskFn& task_fn) {
  const int64_t steps = schedule_steps(n_row, n_col), width = schedule_width(n_row, n_col);
  for (int64_t step = 0; step < steps; ++step) {
    at::parallel_for(0, width, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) task_fn(schedule_pair(step, task, n_row, n_col));
    });
  }
}

std::tuple<at::Tensor, at::Tensor> info_nce_lse_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_t,
                                                    bool with_col, int64_t block) {
  const double s = check_inputs(x, y, inv_t, block);
  const auto acc = accumulate_type(x);
  // Detached: the tile arithmetic must never be recorded by autograd (the pool threads do not
  // inherit the caller's dispatch guards); gradients come from the backward op.
  // Scaling x once makes every tile GEMM give S directly.
  const at::Tensor xs = x.detach().to(acc).mul(s).contiguous();
  const at::Tensor ys = y.detach().to(acc).contiguous();
  const int64_t m = x.size(0), n = y.size(0);
  RunningLse row_stats(m, acc), col_stats(with_col ? n : 0, acc);
  const Workspace ws(2, block, acc);

  for_each_tile_pair(tiles(m, block), tiles(n, block), [&](TilePair p) {
    const int64_t i0 = p.row * block, ti = std::min(block, m - i0);
    const int64_t j0 = p.col * block, tj = std::min(block, n - j0);
    at::Tensor logits = ws.tile(0, ti, tj), work = ws.tile(1, ti, tj);
    at::mm_out(logits, rows(xs, i0, ti), rows(ys, j0, tj).t());
    const at::Tensor row_max = logits.amax(1);
    const at::Tensor col_max = with_col ? logits.amax(0) : at::Tensor();
    const double top = row_max.max().item<double>();
    bool shared = std::isfinite(top) && top - row_max.min().item<double>() <= kSharedOffsetMaxGap;
    if (with_col) shared = shared && top - col_max.min().item<double>() <= kSharedOffsetMaxGap;
    if (shared) {  // one exp per logit serves the row and the column sums
      logits.sub_(top).exp_();
      const at::Tensor offset = at::scalar_tensor(top, logits.options());
      row_stats.merge(i0, ti, offset, logits.sum(1));
      if (with_col) col_stats.merge(j0, tj, offset, logits.sum(0));
    } else {
      row_stats.merge(i0, ti, row_max, at::sub_out(work, logits, row_max.unsqueeze(1)).exp_().sum(1));
      if (with_col) col_stats.merge(j0, tj, col_max, logits.sub_(col_max.unsqueeze(0)).exp_().sum(0));
    }
  });
  at::Tensor col_lse = with_col ? col_stats.finish() : at::empty({0}, x.options().dtype(acc));
  return std::make_tuple(row_stats.finish(), col_lse);
}

// Gradient tile dL/dS = g_row[i] exp(S_ij - lse_row[i]) + g_col[j] exp(S_ij - lse_col[j]), written into
// `grad` (`work` is scratch of the same shape; `logits` is left unchanged).
void gradient_tile(const at::Tensor& logits, const at::Tensor& row_lse, const at::Tensor& row_grad,
                   const at::Tensor& col_lse, const at::Tensor& col_grad, bool with_col, at::Tensor& grad,
                   at::Tensor& work) {
  const double top = logits.max().item<double>();
  bool shared = std::isfinite(top) && top - row_lse.min().item<double>() <= kSharedOffsetMaxGap;
  if (with_col) shared = shared && top - col_lse.min().item<double>() <= kSharedOffsetMaxGap;
  if (shared) {  // G = exp(S - top) * (u_i + v_j): one exp per logit
    at::sub_out(work, logits, top).exp_();
    const at::Tensor u = (row_grad * (top - row_lse).exp_()).unsqueeze(1);
    if (with_col) {
      at::mul_out(grad, work, (col_grad * (top - col_lse).exp_()).unsqueeze(0));
      grad.addcmul_(work, u);
    } else {
      at::mul_out(grad, work, u);
    }
    return;
  }
  at::sub_out(grad, logits, row_lse.unsqueeze(1)).exp_().mul_(row_grad.unsqueeze(1));
  if (with_col) grad.add_(at::sub_out(work, logits, col_lse.unsqueeze(0)).exp_().mul_(col_grad.unsqueeze(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_lse_backward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& inv_t, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const at::Tensor& grad_row_lse, const at::Tensor& grad_col_lse, int64_t block) {
  const double s = check_inputs(x, y, inv_t, block);
  const int64_t m = x.size(0), n = y.size(0);
  const bool with_col = col_lse.numel() > 0;
  TCM_CHECK_VALUE(row_lse.numel() == m && grad_row_lse.numel() == m, kOp,
                  "row_lse and grad_row_lse must have x.size(0) = ", m, " entries, got ", row_lse.numel(), " and ",
                  grad_row_lse.numel());
  TCM_CHECK_VALUE(!with_col || (col_lse.numel() == n && grad_col_lse.numel() == n), kOp,
                  "col_lse and grad_col_lse must be empty or have y.size(0) = ", n, " entries, got ", col_lse.numel(),
                  " and ", grad_col_lse.numel());
  const auto acc = accumulate_type(x);
  const at::Tensor xs = x.detach().to(acc).mul(s).contiguous();  // detached: see info_nce_lse_cpu
  const at::Tensor ys = y.detach().to(acc).contiguous();
  const at::Tensor r = row_lse.detach().to(acc).reshape({m}).contiguous();
  const at::Tensor gr = grad_row_lse.detach().to(acc).reshape({m}).contiguous();
  const at::Tensor c = with_col ? col_lse.detach().to(acc).reshape({n}).contiguous() : at::Tensor();
  const at::Tensor gc = with_col ? grad_col_lse.detach().to(acc).reshape({n}).contiguous() : at::Tensor();
  at::Tensor grad_x = at::zeros({m, x.size(1)}, xs.options());
  at::Tensor grad_y = at::zeros({n, y.size(1)}, ys.options());
  const int64_t n_row = tiles(m, block), n_col = tiles(n, block);
  std::vector<double> logit_dot(n_row * n_col, 0.0);  // <G, S> per tile pair, summed in a fixed order below
  const Workspace ws(3, block, acc);

  for_each_tile_pair(n_row, n_col, [&](TilePair p) {
    const int64_t i0 = p.row * block, ti = std::min(block, m - i0);
    const int64_t j0 = p.col * block, tj = std::min(block, n - j0);
    const at::Tensor x_tile = rows(xs, i0, ti), y_tile = rows(ys, j0, tj);
    at::Tensor logits = ws.tile(0, ti, tj), g = ws.tile(1, ti, tj), work = ws.tile(2, ti, tj);
    at::mm_out(logits, x_tile, y_tile.t());
    gradient_tile(logits, rows(r, i0, ti), rows(gr, i0, ti), with_col ? rows(c, j0, tj) : c,
                  with_col ? rows(gc, j0, tj) : gc, with_col, g, work);
    logit_dot[p.row * n_col + p.col] = at::dot(g.reshape(-1), logits.reshape(-1)).item<double>();
    rows(grad_x, i0, ti).addmm_(g, y_tile);      // dL/dx = inv_t G y  (inv_t applied once below)
    rows(grad_y, j0, tj).addmm_(g.t(), x_tile);  // dL/dy = G^T (inv_t x)
  });
  double dot_sum = 0.0;
  for (double v : logit_dot) dot_sum += v;
  grad_x.mul_(s);
  // dL/dinv_t = sum_ij G_ij (x_i . y_j) = <G, S> / inv_t.
  at::Tensor grad_inv_t = at::scalar_tensor(dot_sum / s, inv_t.options().dtype(inv_t.scalar_type()));
  return std::make_tuple(grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type()), grad_inv_t.reshape(inv_t.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) {
  m.impl("info_nce_lse", &info_nce_lse_cpu);
  m.impl("info_nce_lse_backward", &info_nce_lse_backward_cpu);
}

}  // namespace info_nce
}  // namespace tcm
