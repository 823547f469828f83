"""Sparse normalizations on the compact layout: features [N, C], one row per active site.

The masked-dense ops (:mod:`tcm_kernels.ops.sparse_norm`) read every site of
x [B, C, *S] and skip the inactive ones; here only active sites exist, so the
statistics of a norm are plain reductions over rows:

* batch norm: over all rows of each channel, which is exactly ``torch.batch_norm``
  on [N, C] (PyTorch's fused kernel on every device, with its own backward).
  Running statistics follow the masked-dense op: momentum as nn.BatchNorm, the
  running variance takes the unbiased n / (n - 1) factor, and a single row gives an
  unbiased variance of 0 (the native op would give NaN: that case is done here).
* sync batch norm: each rank's per-channel (count, mean, M2) all-gathered and
  merged in rank order (the masked-dense op's helper); backward all-reduces the two
  per-channel gradient sums. No host synchronisation.
* instance / group norm: per (sample, channel group) over the rows of that
  sample; rows need not be sorted: per-sample sums use ``index_add`` with the batch
  index of each row (coords[:, 0]), deterministic on CPU (on CUDA it uses atomics).
  Two passes (mean, then the squared deviations): a large mean cannot cancel the
  variance. A hand-written backward keeps every reduction a [B, C] table, so a
  forward is 7 passes over the rows and a backward 8; it saves x - mean only.
* layer norm: over the channels of each row: ``torch.layer_norm`` on [N, C].

Statistics are in float32 (float64 for float64 input); outputs have the dtype of
the features. N is a host integer here (the compact layout is built by a
``nonzero``), so empty-batch checks need no device synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_momentum, check_norm_eps, check_same_device, check_tensor
from .._core.dtypes import accumulation_dtype
from .sparse_norm import _all_reduce, _group_moments

_REDUCED = (torch.float16, torch.bfloat16)
_NO_ACTIVE_SITE = "the batch has no active site; batch statistics are undefined"


def _check_features(op: str, features: torch.Tensor, weight, bias) -> None:
    check_tensor(op, "features", features, ndim=2, dtypes=FLOAT_DTYPES)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, ndim=1, dtypes=FLOAT_DTYPES)
            if t.shape[0] != features.shape[1]:
                raise ValueError(f"{op}: {name} must be [C] = [{features.shape[1]}], got shape {tuple(t.shape)}")
            check_same_device(op, features=features, **{name: t})


def _check_batch_index(op: str, features: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> None:
    check_tensor(op, "batch_index", batch_index, ndim=1, dtypes=(torch.int32, torch.int64))
    if batch_index.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: batch_index must be [N] = [{features.shape[0]}], got shape "
                         f"{tuple(batch_index.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"{op}: batch_size must be a non-negative int, got {batch_size!r}")
    check_same_device(op, features=features, batch_index=batch_index)


def _native_params(features: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether torch.batch_norm takes these parameters as they are: one dtype, that of
    the features, or float32 with reduced-precision features (its mixed-type mode)."""
    dtypes = {p.dtype for p in params if p is not None}
    return not dtypes or dtypes == {features.dtype} or (dtypes == {torch.float32} and features.dtype in _REDUCED)


def _update_running(running_mean, running_var, mean, var, n, momentum: float) -> None:
    """nn.BatchNorm's update with the unbiased variance var * n / (n - 1) (0 for n = 1)."""
    with torch.no_grad():
        unbiased = var * n / (n - 1).clamp_min(1) if torch.is_tensor(n) else var * n / max(n - 1, 1)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm of features [N, C] with statistics merged over the ranks of ``group``.

    Returns y [N, C] and the global per-channel (mean, biased var, count) [C] for the
    running-stat update. Backward: with g = dy * w, xhat = (x - mean) * rstd and n the
    global count, dx = rstd * (g - sum(g) / n - xhat * sum(g * xhat) / n), the sums
    all-reduced over the ranks.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, eps, group):
        acc = accumulation_dtype(features.dtype)
        xf = features.to(acc)
        rows = features.shape[0]
        if rows:
            var, mean = torch.var_mean(xf, 0, correction=0)
        else:  # this rank holds no active site; the other ranks' statistics still count
            var, mean = xf.new_zeros(xf.shape[1]), xf.new_zeros(xf.shape[1])
        count = torch.full((1,), rows, dtype=acc, device=features.device)
        n, center, q = _group_moments(count, mean[None], (var * rows)[None], "batch", 1, group)
        n, center, var = n[0], center[0], q[0] / n[0].clamp_min(1)
        rstd = torch.rsqrt(var + eps)
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        y = torch.batch_norm(xf, w, b, center, var, False, 0.0, eps, False).to(features.dtype)
        ctx.save_for_backward(xf, weight, center, rstd, n)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(center, var, n)
        return y, center, var, n

    @staticmethod
    def backward(ctx, dy, _d_mean, _d_var, _d_n):
        xf, weight, center, rstd, n = ctx.saved_tensors
        dyf = dy.to(xf.dtype)
        xc = xf - center
        sum_dy, sum_dy_xc = dyf.sum(0), (dyf * xc).sum(0)
        w = torch.ones_like(rstd) if weight is None else weight.to(rstd.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            sums = _all_reduce(torch.stack([sum_dy * w, sum_dy_xc * w]), ctx.group)
            inv_n = 1.0 / n.clamp_min(1)
            dx = (dyf * (rstd * w) - xc * (rstd ** 3 * sums[1] * inv_n) - rstd * sums[0] * inv_n).to(dy.dtype)
        dweight = (sum_dy_xc * rstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class _SegmentNorm(torch.autograd.Function):
    """Group norm of features [N, C] per (sample, group): statistics over the rows of each sample.

    Every reduction over rows is one ``index_add`` into a [B, C] table (rows in any
    order) and every per-row factor one ``index_select`` of a [B, C] table; the rest
    is arithmetic on those tiny tables. With xc = x - mean, rstd per (b, g), n the
    (sample, group) count and S_b the sum over the rows of sample b:
    y = xc * (rstd w) + b;  A = S_b(dy), Q = S_b(dy * xc) per (b, c);
    dx = dy * rstd w - xc * rstd^3 G(w Q) / n - rstd G(w A) / n with G the sum over
    the channels of a group; dw = sum_b rstd Q; db = sum_b A.
    Saves xc and the [B, G] statistics only.
    """

    @staticmethod
    def forward(ctx, features, seg, batch_size, groups, weight, bias, eps):
        acc = accumulation_dtype(features.dtype)
        rows, c = features.shape
        xf = features.to(acc)
        rows_per_sample = xf.new_zeros(batch_size, 1).index_add_(0, seg, xf.new_ones(rows, 1))
        count = (rows_per_sample * (c // groups)).clamp_min_(1)  # [B, 1]: elements of each (sample, group)
        mean = _to_groups(_row_sum(xf, seg, batch_size), groups) / count
        xc = _from_groups(-mean, c).index_select(0, seg).add_(xf)  # in the gathered buffer: one allocation
        rstd = torch.rsqrt(_to_groups(_row_sum(xc * xc, seg, batch_size), groups) / count + eps)
        scale = _from_groups(rstd, c)  # [B, C]
        if weight is not None:
            scale = scale * weight.to(acc)
        y = scale.index_select(0, seg).mul_(xc)
        if bias is not None:
            y += bias.to(acc)
        ctx.save_for_backward(xc, seg, weight, rstd, count)
        ctx.batch_size, ctx.groups, ctx.bias_dtype = batch_size, groups, None if bias is None else bias.dtype
        return y.to(features.dtype)

    @staticmethod
    def backward(ctx, dy):
        xc, seg, weight, rstd, count = ctx.saved_tensors
        b, groups, c = ctx.batch_size, ctx.groups, xc.shape[1]
        dyf = dy.to(xc.dtype)
        w = torch.ones(c, dtype=xc.dtype, device=xc.device) if weight is None else weight.to(xc.dtype)
        sum_dy = _row_sum(dyf, seg, b)  # [B, C]
        sum_dy_xc = _row_sum(dyf * xc, seg, b)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dy_scale = _from_groups(rstd, c) * w
            x_scale = _from_groups(-rstd ** 3 * _to_groups(sum_dy_xc * w, groups) / count, c)
            shift = _from_groups(-rstd * _to_groups(sum_dy * w, groups) / count, c)
            dx = shift.index_select(0, seg).addcmul_(dyf, dy_scale.index_select(0, seg))
            dx.addcmul_(xc, x_scale.index_select(0, seg))
            dx = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[4]:
            dweight = (sum_dy_xc * _from_groups(rstd, c)).sum(0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
            dbias = sum_dy.sum(0).to(ctx.bias_dtype)
        return dx, None, None, None, dweight, dbias, None


def _row_sum(t: torch.Tensor, seg: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N, C] -> [B, C]: the sum over the rows of each sample (deterministic on CPU)."""
    return t.new_zeros(batch_size, t.shape[1]).index_add_(0, seg, t)


def _to_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C] -> [B, G]: the sum over the channels of each group."""
    b, c = t.shape
    return t if groups == c else t.reshape(b, groups, c // groups).sum(2)


def _from_groups(t: torch.Tensor, c: int) -> torch.Tensor:
    """[B, G] -> [B, C]: each group's value on its channels."""
    return t if t.shape[1] == c else t.repeat_interleave(c // t.shape[1], dim=1)

@autocast_rule("fp32")
def compact_batch_norm(features: torch.Tensor, running_mean: torch.Tensor | None = None,
                       running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, training: bool = True, momentum: float = 0.1,
                       eps: float = 1e-5, *, sync: bool = False, process_group=None) -> torch.Tensor:
    """Batch norm over the rows of compact features (the active sites of every sample).

    Args:
        features: float [N, C], one row per active site.
        running_mean, running_var, weight, bias, training, momentum, eps: as
            :func:`tcm_kernels.sparse_batch_norm` (same update rule).
        sync: merge the statistics over ``process_group`` (torch.distributed) when it
            is initialized; a rank may then hold no rows.

    Returns:
        [N, C], dtype of features.

    Raises RuntimeError when training and there is no row at all (no host sync: N is
    a host integer; with sync the global count is checked by ``torch._assert_async``).
    """
    op = "compact_batch_norm"
    _check_features(op, features, weight, bias)
    eps, momentum = check_norm_eps(op, eps), check_momentum(op, momentum)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together, got only one")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False needs running_mean and running_var, got None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != features.shape[1]):
            raise ValueError(f"{op}: {name} must be [C] = [{features.shape[1]}], got shape {tuple(t.shape)}")
    sync_group = None
    if sync and training and dist.is_available() and dist.is_initialized():
        sync_group = process_group if process_group is not None else dist.group.WORLD
    if sync_group is not None:
        y, mean, var, n = _SyncBatchNorm.apply(features, weight, bias, float(eps), sync_group)
        torch._assert_async(n[0] > 0, f"{op}: {_NO_ACTIVE_SITE}")
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, n, momentum)
        return y
    native = _native_params(features, weight, bias, running_mean, running_var)
    if not native:  # e.g. float64 features with float32 parameters: the op math of the features
        weight = None if weight is None else weight.to(features.dtype)
        bias = None if bias is None else bias.to(features.dtype)
    if not training:
        rm, rv = (running_mean, running_var) if native else (running_mean.to(features.dtype),
                                                             running_var.to(features.dtype))
        return torch.batch_norm(features, weight, bias, rm, rv, False, 0.0, eps, False)
    rows = features.shape[0]
    if rows == 0:
        raise RuntimeError(f"{op}: {_NO_ACTIVE_SITE}")
    native_update = running_mean is not None and native and rows > 1
    y = torch.batch_norm(features, weight, bias, running_mean if native_update else None,
                         running_var if native_update else None, True, momentum, eps, False)
    if running_mean is not None and not native_update:
        with torch.no_grad():
            var, mean = torch.var_mean(features.to(accumulation_dtype(features.dtype)), 0, correction=0)
        _update_running(running_mean, running_var, mean, var, rows, momentum)
    return y


@autocast_rule("fp32")
def compact_group_norm(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int, num_groups: int,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-5) -> torch.Tensor:
    """Group norm per (sample, group of C / num_groups channels) over that sample's rows.

    Args:
        features: float [N, C]; batch_index: int [N], the sample of each row
            (coords[:, 0]; any row order); batch_size: B > max(batch_index).
        weight, bias: optional float [C].

    Returns:
        [N, C], dtype of features. A sample without rows simply has no output rows.
    """
    op = "compact_group_norm"
    _check_features(op, features, weight, bias)
    eps = check_norm_eps(op, eps)
    _check_batch_index(op, features, batch_index, batch_size)
    c = features.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{op}: num_groups must be a positive int dividing C={c}, got {num_groups!r}")
    return _SegmentNorm.apply(features, batch_index.long(), batch_size, num_groups, weight, bias, float(eps))


@autocast_rule("fp32")
def compact_instance_norm(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          eps: float = 1e-5) -> torch.Tensor:
    """Instance norm (AnatoMask) per (sample, channel) over that sample's rows: group norm with C groups.

    features float [N, C]; batch_index int [N] (any row order); weight, bias optional [C]. Returns [N, C].
    """
    check_tensor("compact_instance_norm", "features", features, ndim=2, dtypes=FLOAT_DTYPES)
    return compact_group_norm(features, batch_index, batch_size, features.shape[1], weight, bias, eps)


@autocast_rule("fp32")
def compact_layer_norm(features: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """Layer norm over the channels of each row: features [N, C] -> [N, C]."""
    _check_features("compact_layer_norm", features, weight, bias)
    eps = check_norm_eps("compact_layer_norm", eps)
    return torch.layer_norm(features, (features.shape[1],), weight, bias, eps)
