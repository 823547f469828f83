// CPU kernels of the norm-statistics engine over rows: x [N, C] contiguous (the
// compact layout, one row per active site) with a segment id per row
// (segment [N] int64 in [0, S), or undefined = every row in segment 0). A
// statistic is per (segment, channel); the norms merge segments and channels
// afterwards in Python (batch norm: one segment; instance norm: segment = sample;
// group norm: segment = sample, channels merged per group).
//
//   segment_moments       (count [S], mean [S,C], m2 [S,C])
//   segment_scale_shift   y = (x - center[s]) * scale[s] + shift[s]
//   segment_grad_moments  (sum dy, sum dy * (x - center[s])) per (segment, channel)
//   segment_norm_backward dx = dy * dy_scale[s] + (x - center[s]) * x_scale[s] + shift[s]
//
// Rows may come in any order. The reductions group them with one scan of the ids
// (ids sorted by segment, as SparseTensor.from_dense and sparse_downsample give
// them, need nothing more; other orders get a stable counting sort, O(N + S)),
// then cut every segment into chunks of a fixed number of rows: a chunk is reduced
// exactly (two passes while it is in cache: sums, then squared deviations from
// the chunk mean) and a segment's chunks are merged with Chan's formula in chunk
// order. The chunking does not depend on the thread count and there are no
// atomics, so results are bitwise deterministic. The inner loops run over the
// contiguous channels of a row, which the compiler vectorizes; each loop has AVX-512 / AVX2 / baseline clones picked at
// load time (../common/cpu_dispatch.h), all giving the same bits.
// Accumulation is in at::opmath_type (float for fp16/bf16/fp32, double for fp64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_dispatch.h"
#include "sparse_norm.h"

namespace tcm {
namespace sparse_norm {
namespace {

// Elements of x per reduction chunk: small enough for L1/L2, fixed so that the
// chunking (hence the rounding) never depends on the machine.
constexpr int64_t kChunkElems = 8192;

// The rows of each segment: segment s is rows row(offsets[s] .. offsets[s+1]),
// row(i) = order.empty() ? i : order[i].
struct Grouping {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
  int64_t row(int64_t i) const { return order.empty() ? i : order[i]; }
};

// One chunk: rows [begin, end) of the grouping, all in segment seg.
struct Chunk {
  int64_t seg, begin, end;
};

Grouping group_rows(const char* op, const std::optional<at::Tensor>& segment, int64_t n, int64_t num_segments) {
  Grouping g;
  g.offsets.assign(num_segments + 1, 0);
  if (!segment.has_value()) {
    if (num_segments > 0) g.offsets[1] = n;
    for (int64_t s = 2; s <= num_segments; ++s) g.offsets[s] = n;
    return g;
  }
  const at::Tensor seg_t = segment->contiguous();
  const int64_t* seg = seg_t.const_data_ptr<int64_t>();
  bool sorted = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = seg[i];
    TCM_CHECK_VALUE(s >= 0 && s < num_segments, op, "segment ids must be in [0, ", num_segments, "), got ", s,
                    " at row ", i);
    ++g.offsets[s + 1];
    sorted = sorted && (i == 0 || seg[i - 1] <= s);
  }
  for (int64_t s = 0; s < num_segments; ++s) g.offsets[s + 1] += g.offsets[s];
  if (!sorted) {  // stable counting sort: rows keep their relative order inside a segment
    g.order.resize(n);
    std::vector<int64_t> cursor(g.offsets.begin(), g.offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) g.order[cursor[seg[i]]++] = i;
  }
  return g;
}

std::vector<Chunk> chunks_of(const Grouping& g, int64_t channels) {
  const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(channels, 1));
  std::vector<Chunk> chunks;
  for (size_t s = 0; s + 1 < g.offsets.size(); ++s)
    for (int64_t b = g.offsets[s]; b < g.offsets[s + 1]; b += rows)
      chunks.push_back({static_cast<int64_t>(s), b, std::min(b + rows, g.offsets[s + 1])});
  return chunks;
}

void check_rows(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& segment) {
  TCM_CHECK_VALUE(x.dim() == 2, op, "x must be 2-D [N, C], got shape ", x.sizes());
  TCM_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  if (segment.has_value()) {
    TCM_CHECK_TYPE(segment->scalar_type() == at::kLong, op, "segment must be int64, got ", segment->scalar_type());
    TCM_CHECK_VALUE(segment->dim() == 1 && segment->size(0) == x.size(0), op, "segment must be [N] = [", x.size(0),
                    "], got shape ", segment->sizes());
  }
}

void check_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t segments) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TCM_CHECK_VALUE(t.dim() == 2 && t.size(0) == segments && t.size(1) == x.size(1), op, name, " must be [S, C] = [",
                  segments, ", ", x.size(1), "], got shape ", t.sizes());
  TCM_CHECK_TYPE(t.scalar_type() == acc, op, name, " must be ", acc, ", got ", t.scalar_type());
}

void check_dy(const char* op, const at::Tensor& dy, const at::Tensor& x) {
  TCM_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op,
                  "dy must match x in shape and dtype, got ", dy.sizes(), " ", dy.scalar_type(), " vs ", x.sizes(),
                  " ", x.scalar_type());
}

// The reductions run row by row over all C channels, accumulating into the chunk's row of
// the partial tables (in L1): a long contiguous inner loop that the loop vectorizer takes
// at every ISA. (Blocks of 16 channels with register accumulators were left to SLP, which
// gave up on the squared-deviation pass and emitted scalar code.)

// Moments of one chunk (rows [begin, end) of the grouping): mean [C] and m2 [C].
template <typename scalar_t, typename acc_t>
TCM_CLONE_INLINE void chunk_moments(const scalar_t* __restrict__ x, const Grouping& g, const Chunk& ch, int64_t C,
                                    acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  std::fill(mean, mean + C, acc_t(0));
  std::fill(m2, m2 + C, acc_t(0));
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    const scalar_t* __restrict__ xr = x + g.row(i) * C;
    for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<acc_t>(xr[c]);
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(ch.end - ch.begin);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    const scalar_t* __restrict__ xr = x + g.row(i) * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(xr[c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

// sum(dy) and sum(dy (x - center)) of one chunk, [C] each.
template <typename scalar_t, typename acc_t>
TCM_CLONE_INLINE void chunk_grad_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const Grouping& g, const Chunk& ch, int64_t C, const acc_t* __restrict__ center,
                                      acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xc) {
  std::fill(sum_dy, sum_dy + C, acc_t(0));
  std::fill(sum_dy_xc, sum_dy_xc + C, acc_t(0));
  for (int64_t i = ch.begin; i < ch.end; ++i) {
    const int64_t r = g.row(i) * C;
    const scalar_t* __restrict__ dyr = dy + r;
    const scalar_t* __restrict__ xr = x + r;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(dyr[c]);
      sum_dy[c] += d;
      sum_dy_xc[c] += d * (static_cast<acc_t>(xr[c]) - center[c]);
    }
  }
}

// y = (x - mu) a + b over one row.
template <typename scalar_t, typename acc_t>
TCM_CLONE_INLINE void scale_shift_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                      const acc_t* __restrict__ mu, const acc_t* __restrict__ a,
                                      const acc_t* __restrict__ b, int64_t C) {
  for (int64_t c = 0; c < C; ++c) y[c] = static_cast<scalar_t>((static_cast<acc_t>(x[c]) - mu[c]) * a[c] + b[c]);
}

// dx = dy a + (x - mu) q + b over one row.
template <typename scalar_t, typename acc_t>
TCM_CLONE_INLINE void backward_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ dx, const acc_t* __restrict__ a, const acc_t* __restrict__ q,
                                   const acc_t* __restrict__ mu, const acc_t* __restrict__ b, int64_t C) {
  for (int64_t c = 0; c < C; ++c)
    dx[c] = static_cast<scalar_t>(static_cast<acc_t>(dy[c]) * a[c] + (static_cast<acc_t>(x[c]) - mu[c]) * q[c] + b[c]);
}

// The hot loops over a range of chunks or rows, one cloned entry point per dtype (target_clones
// does not apply to templates): moments and grad sums of chunks [kb, ke) into their partial
// tables, scale-shift and backward of rows [rb, re) with segment ids seg (nullptr = segment 0).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
TCM_CLONE_INLINE void moments_chunks(const scalar_t* x, const Grouping& g, const Chunk* chunks, int64_t kb, int64_t ke,
                                     int64_t C, acc_t* part_mean, acc_t* part_m2) {
  for (int64_t k = kb; k < ke; ++k) chunk_moments(x, g, chunks[k], C, part_mean + k * C, part_m2 + k * C);
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
TCM_CLONE_INLINE void grad_sums_chunks(const scalar_t* dy, const scalar_t* x, const Grouping& g, const Chunk* chunks,
                                       int64_t kb, int64_t ke, int64_t C, const acc_t* center, acc_t* part_a,
                                       acc_t* part_b) {
  for (int64_t k = kb; k < ke; ++k)
    chunk_grad_sums(dy, x, g, chunks[k], C, center + chunks[k].seg * C, part_a + k * C, part_b + k * C);
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
TCM_CLONE_INLINE void scale_shift_rows(const scalar_t* x, scalar_t* y, const int64_t* seg, int64_t rb, int64_t re,
                                       int64_t C, const acc_t* center, const acc_t* scale, const acc_t* shift) {
  for (int64_t r = rb; r < re; ++r) {
    const int64_t s = seg == nullptr ? 0 : seg[r];
    scale_shift_row(x + r * C, y + r * C, center + s * C, scale + s * C, shift + s * C, C);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
TCM_CLONE_INLINE void backward_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const int64_t* seg,
                                    int64_t rb, int64_t re, int64_t C, const acc_t* dy_scale, const acc_t* x_scale,
                                    const acc_t* center, const acc_t* shift) {
  for (int64_t r = rb; r < re; ++r) {
    const int64_t s = seg == nullptr ? 0 : seg[r];
    backward_row(dy + r * C, x + r * C, dx + r * C, dy_scale + s * C, x_scale + s * C, center + s * C,
                 shift + s * C, C);
  }
}

#define TCM_SEGMENT_NORM_CLONES(T)                                                                                  \
  TCM_CLONES void moments_chunks_isa(const T* x, const Grouping& g, const Chunk* chunks, int64_t kb, int64_t ke,     \
                                     int64_t C, at::opmath_type<T>* part_mean, at::opmath_type<T>* part_m2) {        \
    moments_chunks(x, g, chunks, kb, ke, C, part_mean, part_m2);                                                     \
  }                                                                                                                  \
  TCM_CLONES void grad_sums_chunks_isa(const T* dy, const T* x, const Grouping& g, const Chunk* chunks, int64_t kb,  \
                                       int64_t ke, int64_t C, const at::opmath_type<T>* center,                      \
                                       at::opmath_type<T>* part_a, at::opmath_type<T>* part_b) {                     \
    grad_sums_chunks(dy, x, g, chunks, kb, ke, C, center, part_a, part_b);                                           \
  }                                                                                                                  \
  TCM_CLONES void scale_shift_rows_isa(const T* x, T* y, const int64_t* seg, int64_t rb, int64_t re, int64_t C,      \
                                       const at::opmath_type<T>* center, const at::opmath_type<T>* scale,            \
                                       const at::opmath_type<T>* shift) {                                            \
    scale_shift_rows(x, y, seg, rb, re, C, center, scale, shift);                                                    \
  }                                                                                                                  \
  TCM_CLONES void backward_rows_isa(const T* dy, const T* x, T* dx, const int64_t* seg, int64_t rb, int64_t re,      \
                                    int64_t C, const at::opmath_type<T>* dy_scale, const at::opmath_type<T>* x_scale, \
                                    const at::opmath_type<T>* center, const at::opmath_type<T>* shift) {             \
    backward_rows(dy, x, dx, seg, rb, re, C, dy_scale, x_scale, center, shift);                                      \
  }

TCM_SEGMENT_NORM_CLONES(float)
TCM_SEGMENT_NORM_CLONES(double)
TCM_SEGMENT_NORM_CLONES(c10::Half)
TCM_SEGMENT_NORM_CLONES(c10::BFloat16)
#undef TCM_SEGMENT_NORM_CLONES

int64_t row_grain(int64_t channels) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(channels, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_moments_cpu(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& segment,
                                                                   int64_t num_segments) {
  constexpr const char* op = "segment_moments";
  check_rows(op, x_in, segment);
  TCM_CHECK_VALUE(num_segments >= 0, op, "num_segments must be >= 0, got ", num_segments);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = num_segments;
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor count = at::empty({S}, x.options().dtype(acc_type));
  at::Tensor mean = at::empty({S, C}, x.options().dtype(acc_type));
  at::Tensor m2 = at::empty({S, C}, x.options().dtype(acc_type));
  const Grouping g = group_rows(op, segment, N, S);
  const std::vector<Chunk> chunks = chunks_of(g, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t K = static_cast<int64_t>(chunks.size());
    std::vector<acc_t> part_mean(K * C), part_m2(K * C);
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      moments_chunks_isa(xp, g, chunks.data(), kb, ke, C, part_mean.data(), part_m2.data());
    });
    acc_t* cp = count.mutable_data_ptr<acc_t>();
    acc_t* meanp = mean.mutable_data_ptr<acc_t>();
    acc_t* m2p = m2.mutable_data_ptr<acc_t>();
    // Chunks are listed segment by segment; merge each segment's in chunk order.
    std::vector<int64_t> first(S + 1, K);
    for (int64_t k = K - 1; k >= 0; --k) first[chunks[k].seg] = k;
    for (int64_t s = S - 1; s >= 0; --s) first[s] = std::min(first[s], first[s + 1]);
    at::parallel_for(0, S, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        cp[s] = static_cast<acc_t>(g.offsets[s + 1] - g.offsets[s]);
        for (int64_t c = 0; c < C; ++c) {
          Moments<acc_t> m{0, 0, 0};
          for (int64_t k = first[s]; k < first[s + 1]; ++k)
            merge_moments(m, static_cast<acc_t>(chunks[k].end - chunks[k].begin), part_mean[k * C + c],
                          part_m2[k * C + c]);
          meanp[s * C + c] = m.mean;
          m2p[s * C + c] = m.m2;
        }
      }
    });
  });
  return std::make_tuple(count, mean, m2);
}

std::tuple<at::Tensor, at::Tensor> segment_grad_moments_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                            const std::optional<at::Tensor>& segment,
                                                            const at::Tensor& center_in) {
  constexpr const char* op = "segment_grad_moments";
  check_rows(op, x_in, segment);
  check_dy(op, dy_in, x_in);
  const int64_t S = center_in.dim() == 2 ? center_in.size(0) : -1;
  check_table(op, "center", center_in, x_in, S);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), center = center_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor sum_dy = at::empty({S, C}, x.options().dtype(acc_type));
  at::Tensor sum_dy_xc = at::empty({S, C}, x.options().dtype(acc_type));
  const Grouping g = group_rows(op, segment, N, S);
  const std::vector<Chunk> chunks = chunks_of(g, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const acc_t* ce = center.const_data_ptr<acc_t>();
    const int64_t K = static_cast<int64_t>(chunks.size());
    std::vector<acc_t> part_a(K * C), part_b(K * C);
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      grad_sums_chunks_isa(gp, xp, g, chunks.data(), kb, ke, C, ce, part_a.data(), part_b.data());
    });
    acc_t* s1 = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* s2 = sum_dy_xc.mutable_data_ptr<acc_t>();
    std::fill(s1, s1 + S * C, acc_t(0));
    std::fill(s2, s2 + S * C, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {  // chunk order: fixed, whatever the threads did
      const int64_t s = chunks[k].seg;
      for (int64_t c = 0; c < C; ++c) {
        s1[s * C + c] += part_a[k * C + c];
        s2[s * C + c] += part_b[k * C + c];
      }
    }
  });
  return std::make_tuple(sum_dy, sum_dy_xc);
}

// Calls f(rb, re, seg) on blocks of rows in parallel, seg = the segment ids (nullptr: every
// row in segment 0). Ids were range-checked when the statistics were taken; an elementwise
// pass called on its own checks them again (one compare per row, before the block's kernel).
template <typename F>
void for_each_row_block(const char* op, const std::optional<at::Tensor>& segment, int64_t N, int64_t S, int64_t C,
                        F f) {
  const at::Tensor seg_t = segment.has_value() ? segment->contiguous() : at::Tensor();
  const int64_t* seg = seg_t.defined() ? seg_t.const_data_ptr<int64_t>() : nullptr;
  if (seg == nullptr) TCM_CHECK_VALUE(N == 0 || S >= 1, op, "the tables must have a row for segment 0, got S = ", S);
  at::parallel_for(0, N, row_grain(C), [&](int64_t rb, int64_t re) {
    if (seg != nullptr)
      for (int64_t r = rb; r < re; ++r)
        TCM_CHECK_VALUE(seg[r] >= 0 && seg[r] < S, op, "segment ids must be in [0, ", S, "), got ", seg[r], " at row ",
                        r);
    f(rb, re, seg);
  });
}

at::Tensor segment_scale_shift_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& segment,
                                   const at::Tensor& center_in, const at::Tensor& scale_in,
                                   const at::Tensor& shift_in) {
  constexpr const char* op = "segment_scale_shift";
  check_rows(op, x_in, segment);
  const int64_t S = center_in.dim() == 2 ? center_in.size(0) : -1;
  check_table(op, "center", center_in, x_in, S);
  check_table(op, "scale", scale_in, x_in, S);
  check_table(op, "shift", shift_in, x_in, S);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor center = center_in.contiguous(), scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* ce = center.const_data_ptr<acc_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_row_block(op, segment, N, S, C, [&](int64_t rb, int64_t re, const int64_t* seg) {
      scale_shift_rows_isa(xp, yp, seg, rb, re, C, ce, sc, sh);
    });
  });
  return y;
}

at::Tensor segment_norm_backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                     const std::optional<at::Tensor>& segment, const at::Tensor& dy_scale_in,
                                     const at::Tensor& x_scale_in, const at::Tensor& center_in,
                                     const at::Tensor& shift_in) {
  constexpr const char* op = "segment_norm_backward";
  check_rows(op, x_in, segment);
  check_dy(op, dy_in, x_in);
  const int64_t S = center_in.dim() == 2 ? center_in.size(0) : -1;
  check_table(op, "dy_scale", dy_scale_in, x_in, S);
  check_table(op, "x_scale", x_scale_in, x_in, S);
  check_table(op, "center", center_in, x_in, S);
  check_table(op, "shift", shift_in, x_in, S);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor ga = dy_scale_in.contiguous(), xa = x_scale_in.contiguous(), ce = center_in.contiguous(),
                   sh = shift_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const acc_t *gap = ga.const_data_ptr<acc_t>(), *xap = xa.const_data_ptr<acc_t>();
    const acc_t *cep = ce.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    for_each_row_block(op, segment, N, S, C, [&](int64_t rb, int64_t re, const int64_t* seg) {
      backward_rows_isa(gp, xp, dp, seg, rb, re, C, gap, xap, cep, shp);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tcm, CPU, m) {
  m.impl("segment_moments", &segment_moments_cpu);
  m.impl("segment_scale_shift", &segment_scale_shift_cpu);
  m.impl("segment_grad_moments", &segment_grad_moments_cpu);
  m.impl("segment_norm_backward", &segment_norm_backward_cpu);
}

}  // namespace sparse_norm
}  // namespace tcm
