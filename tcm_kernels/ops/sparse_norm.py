"""Sparse (masked) normalizations over the active sites of masked-dense tensors.

Layout: x [B, C, *S] (S of rank 2 or 3), mask bool [B, 1, *S], True = active.
Outputs are exactly 0 at inactive sites. Batch, instance and group norm share one
engine of four fused kernels (compiled C++ on CPU, Triton on CUDA):

1. ``masked_moments``: one pass over x gives, per (b, c) plane, the active count,
   mean and M2 (sum of squared deviations). Chunks of the plane are reduced
   exactly and merged with Chan's formula, in a fixed order: deterministic, and a
   large mean cannot cancel the variance (no sum(x^2) - n mean^2 anywhere).
2. Tiny [B, C] tensor ops merge the planes into each norm's statistic groups
   (over b for batch norm, over the channels of a group for group norm, across
   ranks for the sync variant), with the same formula. No host synchronisation,
   no data-dependent shapes: ``torch.compile(fullgraph=True)`` traces it.
3. ``masked_scale_shift``: y = mask ? (x - mean) * rstd * w + b : 0 in one pass.
4. Backward: ``masked_grad_moments`` (per plane sum(dy), sum(dy (x - mean)) over
   active sites) and ``masked_norm_backward`` (dx in one elementwise pass):
   with g = dy w, xhat = (x - mean) rstd and n active sites per group,
   dx = rstd (g - sum(g) / n - xhat sum(g xhat) / n), zero at inactive sites.

SparK gathers the active sites with ``x[mask]`` (``nonzero``: a host sync and a
data-dependent shape every layer), runs BatchNorm1d and scatters back; this does
the same math without leaving the masked-dense layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_momentum, check_norm_eps, check_same_device, check_tensor
from .._core import shapes
from .._core.dtypes import accumulation_dtype
from ..reference import sparse_norm as _ref
from ._library import register


# ----------------------------------------------------------------------------- custom ops: Triton twins, fakes

@torch.library.custom_op("tcm::masked_moments_triton", mutates_args=())
def _moments_triton(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::masked_moments``; triton is imported on first use."""
    from ..triton.sparse_norm import masked_moments

    return masked_moments(x, mask)


@torch.library.custom_op("tcm::masked_scale_shift_triton", mutates_args=())
def _scale_shift_triton(x: torch.Tensor, mask: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::masked_scale_shift``."""
    from ..triton.sparse_norm import masked_scale_shift

    return masked_scale_shift(x, mask, center, scale, shift)


@torch.library.custom_op("tcm::masked_grad_moments_triton", mutates_args=())
def _grad_moments_triton(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                         center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::masked_grad_moments``."""
    from ..triton.sparse_norm import masked_grad_moments

    return masked_grad_moments(dy, x, mask, center)


@torch.library.custom_op("tcm::masked_norm_backward_triton", mutates_args=())
def _norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dy_scale: torch.Tensor,
                          x_scale: torch.Tensor, center: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Triton back end of ``tcm::masked_norm_backward``."""
    from ..triton.sparse_norm import masked_norm_backward

    return masked_norm_backward(dy, x, mask, dy_scale, x_scale, center, shift)


_PRIMITIVES = ("masked_moments", "masked_scale_shift", "masked_grad_moments", "masked_norm_backward")
for _name in _PRIMITIVES:
    for _suffix in ("", "_triton"):
        register(f"{_name}{_suffix}", getattr(shapes, _name))


def _kernels(backend: str):
    """(moments, scale_shift, grad_moments, norm_backward) of a back end; all take [B, C, L] / [B, L]."""
    suffix = "_triton" if backend == "triton" else ""
    return tuple(getattr(torch.ops.tcm, f"{name}{suffix}") for name in _PRIMITIVES)


# ----------------------------------------------------------------------------- statistic groups

def _merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, dim: int):
    """Chan's merge of disjoint parts' (count, mean, M2) along ``dim`` (count broadcasts against mean)."""
    count = count.expand_as(mean)
    n = count.sum(dim, keepdim=True)
    mu = (count * mean).sum(dim, keepdim=True) / n.clamp_min(1)
    m2 = (m2 + count * (mean - mu) ** 2).sum(dim, keepdim=True)
    return n, mu, m2


def _sum_over_groups(t: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """Sum of per-plane [B, C] values over each statistic group, broadcast back to [B, C]."""
    if kind == "batch":
        return t.sum(0, keepdim=True).expand_as(t)
    if kind == "group":
        b, c = t.shape
        return t.reshape(b, groups, c // groups).sum(2, keepdim=True).expand(b, groups, c // groups).reshape(b, c)
    return t  # instance: every plane is its own group


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def _group_moments(count, mean, m2, kind: str, groups: int, sync_group):
    """(n, mean, M2) of each statistic group, broadcast to [B, C]."""
    b, c = mean.shape
    if kind == "batch":
        n, mu, q = _merge(count.unsqueeze(1), mean, m2, 0)  # [1, C]
        if sync_group is not None:  # gather every rank's (n, mean, M2) and merge them the same way
            world = dist.get_world_size(sync_group)
            parts = [torch.empty_like(torch.cat([n, mu, q])) for _ in range(world)]
            dist.all_gather(parts, torch.cat([n, mu, q]).contiguous(), group=sync_group)
            stacked = torch.stack(parts)  # [world, 3, C]
            n, mu, q = _merge(stacked[:, 0], stacked[:, 1], stacked[:, 2], 0)
        return n.expand(b, c), mu.expand(b, c), q.expand(b, c)
    if kind == "group":
        cg = c // groups
        n, mu, q = _merge(count.reshape(b, 1, 1), mean.reshape(b, groups, cg), m2.reshape(b, groups, cg), 2)
        return (n.expand(b, groups, cg).reshape(b, c), mu.expand(b, groups, cg).reshape(b, c),
                q.expand(b, groups, cg).reshape(b, c))
    return count.unsqueeze(1).expand(b, c), mean, m2


# ----------------------------------------------------------------------------- autograd

class _MaskedNorm(torch.autograd.Function):
    """y = mask ? (x - mean_k) * rstd_k * w_c + b_c : 0 with stats over statistic group k.

    Inputs x3 [B, C, L] contiguous, mask2 [B, L]. When ``stats`` (mean, var [C]) is
    given the statistics are constants (eval mode with running stats). Returns y and
    the group's (mean, biased var, count) per channel-plane for running-stat updates.
    """

    @staticmethod
    def forward(ctx, x3, mask2, weight, bias, eps, kind, groups, stats, sync_group, backend):
        moments, scale_shift, _, _ = _kernels(backend)
        b, c, _ = x3.shape
        acc = accumulation_dtype(x3.dtype)
        if stats is None:
            count, mean, m2 = moments(x3, mask2)
            n, center, q = _group_moments(count, mean, m2, kind, groups, sync_group)
            var = q / n.clamp_min(1)
        else:
            center = stats[0].to(acc).reshape(1, c).expand(b, c)
            var = stats[1].to(acc).reshape(1, c).expand(b, c)
            n = torch.ones_like(var)
        rstd = torch.rsqrt(var + eps)
        w = torch.ones(c, dtype=acc, device=x3.device) if weight is None else weight.to(acc)
        bias_acc = torch.zeros(c, dtype=acc, device=x3.device) if bias is None else bias.to(acc)
        scale = (rstd * w).contiguous()
        y = scale_shift(x3, mask2, center.contiguous(), scale, bias_acc.expand(b, c).contiguous())
        ctx.save_for_backward(x3, mask2, weight, center, rstd, n)
        ctx.constant_stats = stats is not None
        ctx.kind, ctx.groups, ctx.sync_group, ctx.backend = kind, groups, sync_group, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(center, var, n)
        return y, center, var, n

    @staticmethod
    def backward(ctx, dy, _d_center, _d_var, _d_n):
        x3, mask2, weight, center, rstd, n = ctx.saved_tensors
        _, _, grad_moments, norm_backward = _kernels(ctx.backend)
        dy = dy.contiguous()
        c = x3.shape[1]
        sum_dy, sum_dy_xc = grad_moments(dy, x3, mask2, center)
        w = torch.ones(c, dtype=rstd.dtype, device=x3.device) if weight is None else weight.to(rstd.dtype)
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
            dx = norm_backward(dy, x3, mask2, dy_scale, x_scale, center.contiguous(), shift)
        dweight = (sum_dy_xc * rstd).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        dbias = sum_dy.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        return dx, None, dweight, dbias, None, None, None, None, None, None


# ----------------------------------------------------------------------------- checks and entry points

def _check_inputs(op: str, x: torch.Tensor, mask: torch.Tensor, weight, bias, *, spatial_dims=(2, 3)) -> None:
    check_tensor(op, "x", x, ndim=tuple(d + 2 for d in spatial_dims), dtypes=FLOAT_DTYPES)
    check_tensor(op, "mask", mask, dtypes=(torch.bool,))
    want = (x.shape[0], 1, *x.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(f"{op}: mask must be [B, 1, *S] = {list(want)}, got shape {tuple(mask.shape)}")
    check_same_device(op, x=x, mask=mask)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, ndim=1, dtypes=FLOAT_DTYPES)
            if t.shape[0] != x.shape[1]:
                raise ValueError(f"{op}: {name} must be [C] = [{x.shape[1]}], got shape {tuple(t.shape)}")
            check_same_device(op, x=x, **{name: t})


def _flat(x: torch.Tensor, mask: torch.Tensor):
    b, c = x.shape[:2]
    sites = math.prod(x.shape[2:])  # explicit: -1 is ambiguous for an empty batch
    return x.contiguous().reshape(b, c, sites), mask.contiguous().reshape(b, sites)


def _run(x, mask, weight, bias, eps, kind, groups, stats, sync_group, backend):
    x3, m2 = _flat(x, mask)
    y, mean, var, n = _MaskedNorm.apply(x3, m2, weight, bias, float(eps), kind, groups, stats, sync_group, backend)
    return y.reshape(x.shape), mean, var, n


@autocast_rule("fp32")
def sparse_batch_norm(x: torch.Tensor, mask: torch.Tensor, running_mean: torch.Tensor | None = None,
                      running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5, *, sync: bool = False, process_group=None,
                      backend: str | None = None) -> torch.Tensor:
    """Batch norm with statistics over the active sites only (SparK's semantics).

    Args:
        x: float [B, C, *S] masked-dense features (S of rank 2 or 3).
        mask: bool [B, 1, *S], True = active site.
        running_mean, running_var: float [C] buffers, updated in place when training
            (momentum as nn.BatchNorm: new = (1 - momentum) old + momentum batch;
            running_var takes the unbiased variance n / (n - 1) var, n = active sites).
        weight, bias: optional float [C] affine parameters.
        training: batch statistics (True) or running statistics (False).
        sync: all-reduce the statistics over ``process_group`` (torch.distributed);
            ignored when distributed is not initialized.
        backend: force ``"reference" | "cpu" | "triton"``.

    Returns:
        float [B, C, *S], dtype of x: normalized at active sites, exactly 0 elsewhere.

    Raises RuntimeError (without a host sync on GPUs: an async assert) when training
    and the batch has no active site at all: the statistics are undefined.
    """
    op = "sparse_batch_norm"
    _check_inputs(op, x, mask, weight, bias)
    eps, momentum = check_norm_eps(op, eps), check_momentum(op, momentum)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together, got only one")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False needs running_mean and running_var, got None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[1]):
            raise ValueError(f"{op}: {name} must be [C] = [{x.shape[1]}], got shape {tuple(t.shape)}")
    if training and (x.shape[0] == 0 or x.shape[1] == 0 or x[0, 0].numel() == 0):
        raise ValueError(f"{op}: training needs at least one sample, channel and site, got shape {tuple(x.shape)}")
    chosen = _backend.choose_backend("masked_moments", x.device, backend)
    if chosen == "reference":
        if training:
            torch._assert_async(mask.any(), f"{op}: the batch has no active site; batch statistics are undefined")
        return _ref.sparse_batch_norm(x, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    sync_group = None
    if sync and training and dist.is_available() and dist.is_initialized():
        sync_group = process_group if process_group is not None else dist.group.WORLD
    stats = None if training else (running_mean, running_var)
    y, mean, var, n = _run(x, mask, weight, bias, eps, "batch", 1, stats, sync_group, chosen)
    if training:
        torch._assert_async(n[0, 0] > 0, f"{op}: the batch has no active site; batch statistics are undefined")
        if running_mean is not None:
            with torch.no_grad():
                n1 = n[0]
                unbiased = var[0] * n1 / (n1 - 1).clamp_min(1)
                running_mean.mul_(1 - momentum).add_(mean[0].to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y


@autocast_rule("fp32")
def sparse_group_norm(x: torch.Tensor, mask: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                      backend: str | None = None) -> torch.Tensor:
    """Group norm with statistics per (sample, group) over the active sites.

    x float [B, C, *S], mask bool [B, 1, *S], C divisible by ``num_groups``; weight,
    bias optional [C]. A sample without active sites gives zeros (no NaN).
    Returns [B, C, *S], exactly 0 at inactive sites.
    """
    op = "sparse_group_norm"
    _check_inputs(op, x, mask, weight, bias)
    eps = check_norm_eps(op, eps)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"{op}: num_groups must be a positive int dividing C={x.shape[1]}, got {num_groups!r}")
    chosen = _backend.choose_backend("masked_moments", x.device, backend)
    if chosen == "reference":
        return _ref.sparse_group_norm(x, mask, num_groups, weight, bias, eps)
    return _run(x, mask, weight, bias, eps, "group", num_groups, None, None, chosen)[0]


@autocast_rule("fp32")
def sparse_instance_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                         backend: str | None = None) -> torch.Tensor:
    """Instance norm (AnatoMask): statistics per (sample, channel) over the active sites.

    x float [B, C, *S], mask bool [B, 1, *S]; weight, bias optional [C]. A sample
    without active sites gives zeros. Returns [B, C, *S], 0 at inactive sites.
    """
    op = "sparse_instance_norm"
    _check_inputs(op, x, mask, weight, bias)
    eps = check_norm_eps(op, eps)
    chosen = _backend.choose_backend("masked_moments", x.device, backend)
    if chosen == "reference":
        return _ref.sparse_instance_norm(x, mask, weight, bias, eps)
    return _run(x, mask, weight, bias, eps, "instance", 1, None, None, chosen)[0]


@autocast_rule("fp32")
def sparse_layer_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-6, *, channels_last: bool = False,
                      backend: str | None = None) -> torch.Tensor:
    """Layer norm over the channels of each site (SparK's ConvNeXt norm); 0 at inactive sites.

    channels_last=False: x [B, C, *S], mask [B, 1, *S]; True: x [B, *S, C], mask [B, *S, 1].
    The statistics of a site never involve other sites, so the mask only zeroes the
    output: this is ``torch.layer_norm`` (already one fused kernel per back end) and
    a select, with no kernel of its own.
    """
    op = "sparse_layer_norm"
    eps = check_norm_eps(op, eps)
    if channels_last:
        check_tensor(op, "x", x, ndim=(4, 5), dtypes=FLOAT_DTYPES)
        check_tensor(op, "mask", mask, dtypes=(torch.bool,))
        want = (*x.shape[:-1], 1)
        if tuple(mask.shape) != want:
            raise ValueError(f"{op}: mask must be [B, *S, 1] = {list(want)}, got shape {tuple(mask.shape)}")
        xc, mc = x, mask
    else:
        _check_inputs(op, x, mask, None, None)
        xc, mc = x.movedim(1, -1), mask.movedim(1, -1)
    c = xc.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != c):
            raise ValueError(f"{op}: {name} must be [C] = [{c}], got shape {tuple(t.shape)}")
    if backend not in (None, "reference"):
        raise ValueError(f"{op}: backend must be None or 'reference' (no kernel of its own), got {backend!r}")
    if backend == "reference":
        return _ref.sparse_layer_norm(x, mask, weight, bias, eps, channels_last)
    y = torch.layer_norm(xc, (c,), weight, bias, eps)
    y = torch.where(mc, y, 0)
    return y if channels_last else y.movedim(-1, 1)


@autocast_rule("lowp")
def densify(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """SparK's densify: x at active sites, the learned per-channel ``mask_token`` elsewhere.

    Args:
        x: float [B, C, *S]; mask: bool [B, 1, *S]; mask_token: float [C] or
            [1, C, 1, ...] (SparK's nn.Parameter shape).
    Returns:
        [B, C, *S]. Gradients: dx = dy at active sites (0 elsewhere); d mask_token =
        the sum of dy over the inactive sites of each channel. One elementwise
        select (``torch.where``), which every back end already fuses.
    """
    op = "densify"
    _check_inputs(op, x, mask, None, None)
    check_tensor(op, "mask_token", mask_token, dtypes=FLOAT_DTYPES)
    if mask_token.numel() != x.shape[1] or any(s != 1 for i, s in enumerate(mask_token.shape)
                                               if mask_token.dim() > 1 and i != 1):
        raise ValueError(f"{op}: mask_token must be [C] or [1, C, 1, ...] with C={x.shape[1]}, "
                         f"got shape {tuple(mask_token.shape)}")
    check_same_device(op, x=x, mask_token=mask_token)
    return _ref.densify(x, mask, mask_token)
