"""Sparse normalizations on the compact layout: features [N, C], one row per active site.

Batch, instance and group norm are adapters of the norm-statistics engine
(:mod:`tcm_kernels.ops.sparse_norm_engine`) in its ``"rows"`` layout, the same engine as the
masked-dense ops (:mod:`tcm_kernels.ops.sparse_norm`):

* batch norm: one segment (every row). Running statistics follow the masked-dense op:
  momentum as nn.BatchNorm, the running variance takes the unbiased n / (n - 1) factor (0 for
  a single row). Synchronised: each rank's per-channel (count, mean, M2) is all-gathered and
  merged in rank order, and the backward all-reduces the two per-channel gradient sums; a rank
  may hold no rows.
* instance / group norm: segment = the sample of each row (coords[:, 0]); rows need not be
  sorted (sorted rows, as ``SparseTensor.from_dense`` and ``sparse_downsample`` give them, cost
  nothing extra; other orders a counting sort). Group norm merges the channels of a group.
  A sample without rows has no output rows.
* layer norm: over the channels of each row: ``torch.layer_norm`` on [N, C].

Forward: one statistics pass and one apply pass over the rows; backward: one pass for the two
per-(segment, channel) gradient sums and one elementwise pass. Deterministic on every back end
(no atomics). Statistics are in float32 (float64 for float64 input); outputs have the dtype of
the features. N is a host integer here (the compact layout is built by a ``nonzero``), so
empty-batch checks need no device synchronisation.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_momentum, check_norm_eps, check_same_device, check_tensor
from ..reference import sparse_norm as _ref
from .sparse_norm_engine import NO_ACTIVE_SITE, normalize, sync_group_of, update_running


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


@autocast_rule("fp32")
def compact_batch_norm(features: torch.Tensor, running_mean: torch.Tensor | None = None,
                       running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, training: bool = True, momentum: float = 0.1,
                       eps: float = 1e-5, *, sync: bool = False, process_group=None,
                       backend: str | None = None) -> torch.Tensor:
    """Batch norm over the rows of compact features (the active sites of every sample).

    Args:
        features: float [N, C], one row per active site.
        running_mean, running_var, weight, bias, training, momentum, eps: as
            :func:`tcm_kernels.sparse_batch_norm` (same update rule).
        sync: merge the statistics over ``process_group`` (torch.distributed) when it
            is initialized; a rank may then hold no rows.
        backend: force ``"reference" | "cpu" | "triton"``.

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
    sync_group = sync_group_of(sync, training, process_group)
    if training and sync_group is None and features.shape[0] == 0:
        raise RuntimeError(f"{op}: {NO_ACTIVE_SITE}")
    chosen = _backend.choose_backend("segment_moments", features.device, backend)
    if chosen == "reference" and sync_group is None:
        return _ref.compact_batch_norm(features, running_mean, running_var, weight, bias, training, momentum, eps)
    stats = None if training else (running_mean, running_var)
    y, mean, var, n = normalize(features.contiguous(), None, 1, weight, bias, eps, "batch", 1, layout="rows",
                                backend=chosen, stats=stats, sync_group=sync_group)
    if training:
        if sync_group is not None:
            torch._assert_async(n[0, 0] > 0, f"{op}: {NO_ACTIVE_SITE}")
        if running_mean is not None:
            update_running(running_mean, running_var, mean[0], var[0], n[0], momentum)
    return y


@autocast_rule("fp32")
def compact_group_norm(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int, num_groups: int,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """Group norm per (sample, group of C / num_groups channels) over that sample's rows.

    Args:
        features: float [N, C]; batch_index: int [N], the sample of each row
            (coords[:, 0]; any row order, ascending is fastest); batch_size: B > max(batch_index).
        weight, bias: optional float [C].
        backend: force ``"reference" | "cpu" | "triton"``.

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
    chosen = _backend.choose_backend("segment_moments", features.device, backend)
    if chosen == "reference":
        return _ref.compact_group_norm(features, batch_index, batch_size, num_groups, weight, bias, eps)
    segment = batch_index.long()
    if features.device.type != "cpu":  # the CPU kernel checks the ids itself; no host sync here
        torch._assert_async(((segment >= 0) & (segment < batch_size)).all(),
                            f"{op}: batch_index must be in [0, batch_size={batch_size})")
    kind = "instance" if num_groups == c else "group"
    return normalize(features.contiguous(), segment, batch_size, weight, bias, eps, kind, num_groups, layout="rows",
                     backend=chosen)[0]


@autocast_rule("fp32")
def compact_instance_norm(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """Instance norm (AnatoMask) per (sample, channel) over that sample's rows: group norm with C groups.

    features float [N, C]; batch_index int [N] (any row order); weight, bias optional [C]. Returns [N, C].
    """
    check_tensor("compact_instance_norm", "features", features, ndim=2, dtypes=FLOAT_DTYPES)
    return compact_group_norm(features, batch_index, batch_size, features.shape[1], weight, bias, eps,
                              backend=backend)


@autocast_rule("fp32")
def compact_layer_norm(features: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """Layer norm over the channels of each row: features [N, C] -> [N, C]."""
    _check_features("compact_layer_norm", features, weight, bias)
    eps = check_norm_eps("compact_layer_norm", eps)
    return torch.layer_norm(features, (features.shape[1],), weight, bias, eps)
