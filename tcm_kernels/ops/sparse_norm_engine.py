"""The norm-statistics engine: every sparse batch, instance and group norm, on either layout.

A norm is a table of moments per (segment, channel) over rows, merged into statistic groups:
batch norm merges every segment (and, synchronised, every rank), instance norm keeps each
(sample, channel), group norm merges the channels of a group within a sample. Four primitives
do all the passes over the data; everything between them is arithmetic on [S, C] tables:

1. ``moments``: per (segment, channel), the row count, mean and M2 (sum of squared deviations).
   Chunks are reduced exactly and merged with Chan's formula in a fixed order: deterministic,
   and a large mean cannot cancel the variance (no sum(x^2) - n mean^2 anywhere).
2. ``scale_shift``: y = (x - center) * scale + shift with the row's segment's table entries.
3. ``grad_moments``: per (segment, channel), sum(dy) and sum(dy (x - center)).
4. ``norm_backward``: with g = dy w, xhat = (x - mean) rstd and n rows per statistic group,
   dx = rstd (g - sum(g) / n - xhat sum(g xhat) / n) in one elementwise pass.

The primitives exist for two layouts, registered as ``tcm::<prefix>_<primitive>`` (compiled CPU)
and ``tcm::<prefix>_<primitive>_triton``:

* ``"rows"`` (prefix ``segment``): the compact layout, x [N, C] with a segment id per row
  (int64 [N], any order; None = one segment) and S segments;
* ``"planes"`` (prefix ``masked``): the masked-dense layout read through its mask, x [B, C, L]
  with mask bool [B, L]; the rows of segment b are the active sites of sample b (S = B).
  Reading the masked-dense tensor in place is what keeps the masked-dense batch norm several
  times faster than gathering the active sites (SparK): a gather, the rows engine and a scatter
  would cost three more passes and a host sync (docs/norm_loss.md).

No host synchronisation and no data-dependent shapes: ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._core import shapes
from .._core.dtypes import accumulation_dtype
from .._core.moments import merge_moments
from ..reference import sparse_norm as _ref
from ._library import register

_PRIMITIVES = ("moments", "scale_shift", "grad_moments", "norm_backward")
_PREFIX = {"planes": "masked", "rows": "segment"}
NO_ACTIVE_SITE = "the batch has no active site; batch statistics are undefined"


# ----------------------------------------------------------------------------- custom ops: Triton twins, fakes

@torch.library.custom_op("tcm::masked_moments_triton", mutates_args=())
def _masked_moments_triton(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::masked_moments``; triton is imported on first use."""
    from ..triton.sparse_norm import masked_moments

    return masked_moments(x, mask)


@torch.library.custom_op("tcm::masked_scale_shift_triton", mutates_args=())
def _masked_scale_shift_triton(x: torch.Tensor, mask: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
                               shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::masked_scale_shift``."""
    from ..triton.sparse_norm import masked_scale_shift

    return masked_scale_shift(x, mask, center, scale, shift)


@torch.library.custom_op("tcm::masked_grad_moments_triton", mutates_args=())
def _masked_grad_moments_triton(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                                center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::masked_grad_moments``."""
    from ..triton.sparse_norm import masked_grad_moments

    return masked_grad_moments(dy, x, mask, center)


@torch.library.custom_op("tcm::masked_norm_backward_triton", mutates_args=())
def _masked_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dy_scale: torch.Tensor,
                                 x_scale: torch.Tensor, center: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::masked_norm_backward``."""
    from ..triton.sparse_norm import masked_norm_backward

    return masked_norm_backward(dy, x, mask, dy_scale, x_scale, center, shift)


@torch.library.custom_op("tcm::segment_moments_triton", mutates_args=())
def _segment_moments_triton(x: torch.Tensor, segment: torch.Tensor | None,
                            num_segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::segment_moments``."""
    from ..triton.sparse_norm import segment_moments

    return segment_moments(x, segment, num_segments)


@torch.library.custom_op("tcm::segment_scale_shift_triton", mutates_args=())
def _segment_scale_shift_triton(x: torch.Tensor, segment: torch.Tensor | None, center: torch.Tensor,
                                scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::segment_scale_shift``."""
    from ..triton.sparse_norm import segment_scale_shift

    return segment_scale_shift(x, segment, center, scale, shift)


@torch.library.custom_op("tcm::segment_grad_moments_triton", mutates_args=())
def _segment_grad_moments_triton(dy: torch.Tensor, x: torch.Tensor, segment: torch.Tensor | None,
                                 center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::segment_grad_moments``."""
    from ..triton.sparse_norm import segment_grad_moments

    return segment_grad_moments(dy, x, segment, center)


@torch.library.custom_op("tcm::segment_norm_backward_triton", mutates_args=())
def _segment_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, segment: torch.Tensor | None,
                                  dy_scale: torch.Tensor, x_scale: torch.Tensor, center: torch.Tensor,
                                  shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::segment_norm_backward``."""
    from ..triton.sparse_norm import segment_norm_backward

    return segment_norm_backward(dy, x, segment, dy_scale, x_scale, center, shift)


for _prefix in _PREFIX.values():
    for _name in _PRIMITIVES:
        for _suffix in ("", "_triton"):
            register(f"{_prefix}_{_name}{_suffix}", getattr(shapes, f"{_prefix}_{_name}"))


def _kernels(layout: str, backend: str):
    """(moments, scale_shift, grad_moments, norm_backward) of a layout and back end.

    ``"reference"`` (rows only) gives the plain-PyTorch primitives: the synchronised compact
    batch norm runs on them when the compiled kernels are missing.
    """
    if backend == "reference":
        return tuple(getattr(_ref, f"segment_{name}") for name in _PRIMITIVES)
    suffix = "_triton" if backend == "triton" else ""
    return tuple(getattr(torch.ops.tcm, f"{_PREFIX[layout]}_{name}{suffix}") for name in _PRIMITIVES)


# ----------------------------------------------------------------------------- statistic groups

def _sum_over_groups(t: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """Sum of per-(segment, channel) [S, C] values over each statistic group, broadcast back to [S, C]."""
    if kind == "batch":
        return t.sum(0, keepdim=True).expand_as(t)
    if kind == "group":
        s, c = t.shape
        return t.reshape(s, groups, c // groups).sum(2, keepdim=True).expand(s, groups, c // groups).reshape(s, c)
    return t  # instance: every (segment, channel) is its own group


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def _group_moments(count, mean, m2, kind: str, groups: int, sync_group):
    """(n, mean, M2) of each statistic group, broadcast to [S, C]."""
    s, c = mean.shape
    if kind == "batch":
        n, mu, q = merge_moments(count.unsqueeze(1), mean, m2, 0)  # [1, C]
        if sync_group is not None:  # gather every rank's (n, mean, M2) and merge them the same way
            world = dist.get_world_size(sync_group)
            parts = [torch.empty_like(torch.cat([n, mu, q])) for _ in range(world)]
            dist.all_gather(parts, torch.cat([n, mu, q]).contiguous(), group=sync_group)
            stacked = torch.stack(parts)  # [world, 3, C]
            n, mu, q = merge_moments(stacked[:, 0], stacked[:, 1], stacked[:, 2], 0)
        return n.expand(s, c), mu.expand(s, c), q.expand(s, c)
    if kind == "group":
        cg = c // groups
        n, mu, q = merge_moments(count.reshape(s, 1, 1), mean.reshape(s, groups, cg), m2.reshape(s, groups, cg), 2)
        return (n.expand(s, groups, cg).reshape(s, c), mu.expand(s, groups, cg).reshape(s, c),
                q.expand(s, groups, cg).reshape(s, c))
    return count.unsqueeze(1).expand(s, c), mean, m2


# ----------------------------------------------------------------------------- autograd

class _NormEngine(torch.autograd.Function):
    """y = (x - mean_k) * rstd_k * w_c + b_c over the rows of the layout, stats over statistic group k.

    x and index are a layout's data: ``"rows"`` x [N, C] contiguous with segment int64 [N] or
    None; ``"planes"`` x [B, C, L] contiguous with mask bool [B, L] (y is 0 at inactive sites).
    When ``stats`` (mean, var [C]) is given the statistics are constants (eval mode with running
    stats). Returns y and the group's (mean, biased var, count) as [S, C] tables for
    running-stat updates.
    """

    @staticmethod
    def forward(ctx, x, index, num_segments, weight, bias, eps, kind, groups, stats, sync_group, layout, backend):
        moments, scale_shift, _, _ = _kernels(layout, backend)
        c = x.shape[1]
        s = x.shape[0] if layout == "planes" else num_segments
        acc = accumulation_dtype(x.dtype)
        if stats is None:
            count, mean, m2 = moments(x, index) if layout == "planes" else moments(x, index, num_segments)
            n, center, q = _group_moments(count, mean, m2, kind, groups, sync_group)
            var = q / n.clamp_min(1)
        else:
            center = stats[0].to(acc).reshape(1, c).expand(s, c)
            var = stats[1].to(acc).reshape(1, c).expand(s, c)
            n = torch.ones_like(var)
        rstd = torch.rsqrt(var + eps)
        w = torch.ones(c, dtype=acc, device=x.device) if weight is None else weight.to(acc)
        bias_acc = torch.zeros(c, dtype=acc, device=x.device) if bias is None else bias.to(acc)
        center = center.contiguous()
        y = scale_shift(x, index, center, (rstd * w).contiguous(), bias_acc.expand(s, c).contiguous())
        ctx.save_for_backward(x, index, weight, center, rstd, n)
        ctx.constant_stats = stats is not None
        ctx.kind, ctx.groups, ctx.sync_group, ctx.layout, ctx.backend = kind, groups, sync_group, layout, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(center, var, n)
        return y, center, var, n

    @staticmethod
    def backward(ctx, dy, _d_center, _d_var, _d_n):
        x, index, weight, center, rstd, n = ctx.saved_tensors
        _, _, grad_moments, norm_backward = _kernels(ctx.layout, ctx.backend)
        dy = dy.contiguous()
        c = x.shape[1]
        sum_dy, sum_dy_xc = grad_moments(dy, x, index, center)
        w = torch.ones(c, dtype=rstd.dtype, device=x.device) if weight is None else weight.to(rstd.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dy_scale = (rstd * w).contiguous()
            if ctx.constant_stats:
                x_scale = torch.zeros_like(rstd)
                shift = torch.zeros_like(rstd)
            else:
                sum_g = _sum_over_groups(sum_dy * w, ctx.kind, ctx.groups)
                sum_gxc = _sum_over_groups(sum_dy_xc * w, ctx.kind, ctx.groups)
                if ctx.sync_group is not None:
                    both = _all_reduce(torch.stack([sum_g, sum_gxc]), ctx.sync_group)
                    sum_g, sum_gxc = both[0], both[1]
                inv_n = 1.0 / n.clamp_min(1)
                x_scale = (-(rstd ** 3) * sum_gxc * inv_n).contiguous()
                shift = (-rstd * sum_g * inv_n).contiguous()
            dx = norm_backward(dy, x, index, dy_scale, x_scale, center, shift)
        dweight = (sum_dy_xc * rstd).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        dbias = sum_dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[4] else None
        return dx, None, None, dweight, dbias, None, None, None, None, None, None, None


def normalize(x: torch.Tensor, index: torch.Tensor | None, num_segments: int, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float, kind: str, groups: int, *, layout: str, backend: str,
              stats: tuple[torch.Tensor, torch.Tensor] | None = None, sync_group=None):
    """Run the engine: (y shaped like x, mean [S, C], biased var [S, C], count [S, C]) of each row's group.

    kind ``"batch" | "instance" | "group"`` (``groups`` channel groups); layout ``"rows" | "planes"``
    with x and index as :class:`_NormEngine`; backend ``"cpu" | "triton"`` (or ``"reference"``, rows only).
    """
    return _NormEngine.apply(x, index, num_segments, weight, bias, float(eps), kind, groups, stats, sync_group,
                             layout, backend)


def sync_group_of(sync: bool, training: bool, process_group):
    """The process group batch statistics are merged over, or None (not synchronised)."""
    if sync and training and dist.is_available() and dist.is_initialized():
        return process_group if process_group is not None else dist.group.WORLD
    return None


def update_running(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   n: torch.Tensor, momentum: float) -> None:
    """nn.BatchNorm's update from a batch's [C] mean, biased var and count (unbiased: var n / (n - 1))."""
    with torch.no_grad():
        unbiased = var * n / (n - 1).clamp_min(1)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
