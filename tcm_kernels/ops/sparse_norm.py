"""Sparse (masked) normalizations over the active sites of masked-dense tensors.

Layout: x [B, C, *S] (S of rank 2 or 3), mask bool [B, 1, *S], True = active.
Outputs are exactly 0 at inactive sites. Batch, instance and group norm are adapters of the
norm-statistics engine (:mod:`tcm_kernels.ops.sparse_norm_engine`) in its ``"planes"`` layout:
the rows are the active sites, read in place through the mask (x viewed as [B, C, L]), the
segments are the samples. The compact layout ([N, C] rows) is
:mod:`tcm_kernels.ops.sparse_norm_compact`, over the same engine.

SparK gathers the active sites with ``x[mask]`` (``nonzero``: a host sync and a
data-dependent shape every layer), runs BatchNorm1d and scatters back; this does
the same math without leaving the masked-dense layout.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_momentum, check_norm_eps, check_same_device, check_tensor
from ..reference import sparse_norm as _ref
from .sparse_norm_engine import NO_ACTIVE_SITE, normalize, sync_group_of, update_running


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
    y, mean, var, n = normalize(x3, m2, x.shape[0], weight, bias, eps, kind, groups, layout="planes",
                                backend=backend, stats=stats, sync_group=sync_group)
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
            torch._assert_async(mask.any(), f"{op}: {NO_ACTIVE_SITE}")
        return _ref.sparse_batch_norm(x, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    stats = None if training else (running_mean, running_var)
    sync_group = sync_group_of(sync, training, process_group)
    y, mean, var, n = _run(x, mask, weight, bias, eps, "batch", 1, stats, sync_group, chosen)
    if training:
        torch._assert_async(n[0, 0] > 0, f"{op}: {NO_ACTIVE_SITE}")
        if running_mean is not None:
            update_running(running_mean, running_var, mean[0], var[0], n[0], momentum)
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
