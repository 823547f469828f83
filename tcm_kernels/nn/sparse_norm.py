"""Sparse normalization modules on either layout.

``module(x, mask)``: masked-dense x [B, C, *S] with mask bool [B, 1, *S] -> the
normalized x, exactly 0 at inactive sites. ``module(st)``: a compact
:class:`tcm_kernels.SparseTensor` -> a SparseTensor with the same coords, row order
and batch size (``st.replace_features``). Both give the same numbers at the active
sites, the same gradients and the same running-stat updates (tested): both layouts are
adapters of one norm-statistics engine (:mod:`tcm_kernels.ops.sparse_norm_engine`), and
``backend`` picks its back end on either.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_momentum, check_norm_eps
from ..ops import sparse_norm as F
from ..ops import sparse_norm_compact as FC
from ..sparse_tensor import SparseTensor


def _compact_input(module: nn.Module, x, mask, channels: int, spatial_dims: tuple[int, ...]) -> bool:
    """True when ``x`` is a SparseTensor (checked against the module), False for masked-dense (x, mask)."""
    name = type(module).__name__
    if not isinstance(x, SparseTensor):
        if mask is None:
            raise ValueError(f"{name}: mask must be a bool tensor [B, 1, *S] when x is masked-dense, got None")
        return False
    if mask is not None:
        raise ValueError(f"{name}: pass either a SparseTensor or (x, mask), got a SparseTensor and a mask")
    if x.ndim not in spatial_dims:
        want = " or ".join(str(d) for d in spatial_dims)
        raise ValueError(f"{name}: x must be a SparseTensor with {want} spatial dims, got {x.ndim}")
    if x.features.shape[1] != channels:
        raise ValueError(f"{name}: x must have {channels} channels, got features of shape "
                         f"{tuple(x.features.shape)}")
    return True


class _SparseBatchNorm(nn.modules.batchnorm._NormBase):
    """nn.BatchNorm with statistics over the active sites only (SparK semantics).

    Same constructor, buffers and state dict as ``nn.BatchNorm{2,3}d`` (so dense
    checkpoints load), plus ``sync``: all-reduce the statistics over
    ``process_group`` with torch.distributed when it is initialized, and ``backend``
    (None = automatic, or ``"reference" | "cpu" | "triton"``).
    """

    _spatial_dims = 2
    _sparse_dims: tuple[int, ...] = (2,)  # spatial ranks a SparseTensor input may have

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, sync: bool = False, process_group=None, backend: str | None = None,
                 device=None, dtype=None):
        name = type(self).__name__
        check_norm_eps(name, eps)
        if momentum is not None:  # None: cumulative moving average, as nn.BatchNorm
            check_momentum(name, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.sync = sync
        self.process_group = process_group
        self.backend = backend

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != self._spatial_dims + 2:
            raise ValueError(f"{type(self).__name__}: x must be {self._spatial_dims + 2}-D [B, C, *S], "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x [B, C, *S], mask bool [B, 1, *S]) -> [B, C, *S]; or SparseTensor -> SparseTensor."""
        compact = _compact_input(self, x, mask, self.num_features, self._sparse_dims)
        if not compact:
            self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        track = self.training and self.track_running_stats
        running_mean = self.running_mean if (track or not use_batch_stats) else None
        running_var = self.running_var if (track or not use_batch_stats) else None
        if compact:
            return x.replace_features(FC.compact_batch_norm(
                x.features, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum, self.eps,
                sync=self.sync, process_group=self.process_group, backend=self.backend))
        return F.sparse_batch_norm(x, mask, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                   momentum, self.eps, sync=self.sync, process_group=self.process_group,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")


class SparseBatchNorm2d(_SparseBatchNorm):
    """Sparse batch norm over x [B, C, H, W] with mask [B, 1, H, W], or a 2-D SparseTensor."""

    _spatial_dims = 2
    _sparse_dims = (2,)


class SparseBatchNorm3d(_SparseBatchNorm):
    """Sparse batch norm over x [B, C, D, H, W] with mask [B, 1, D, H, W], or a 3-D SparseTensor."""

    _spatial_dims = 3
    _sparse_dims = (3,)


class SparseSyncBatchNorm(_SparseBatchNorm):
    """Sparse batch norm whose statistics are all-reduced across ranks (2-D or 3-D input)."""

    _sparse_dims = (2, 3)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, sync=True,
                         process_group=process_group, backend=backend, device=device, dtype=dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (4, 5):
            raise ValueError(f"SparseSyncBatchNorm: x must be 4-D or 5-D [B, C, *S], got shape {tuple(x.shape)}")


class _SparseInstanceNorm(nn.Module):
    _spatial_dims = 2

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.affine, self.backend = num_features, eps, affine, backend
        check_norm_eps(type(self).__name__, eps)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x [B, C, *S], mask bool [B, 1, *S]) -> [B, C, *S]; or SparseTensor -> SparseTensor."""
        if _compact_input(self, x, mask, self.num_features, (self._spatial_dims,)):
            return x.replace_features(FC.compact_instance_norm(x.features, x.coords[:, 0], x.batch_size, self.weight,
                                                               self.bias, self.eps, backend=self.backend))
        if x.dim() != self._spatial_dims + 2:
            raise ValueError(f"{type(self).__name__}: x must be {self._spatial_dims + 2}-D [B, C, *S], "
                             f"got shape {tuple(x.shape)}")
        return F.sparse_instance_norm(x, mask, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class SparseInstanceNorm2d(_SparseInstanceNorm):
    """Instance norm per (sample, channel) over the active sites of x [B, C, H, W] (no running stats)."""

    _spatial_dims = 2


class SparseInstanceNorm3d(_SparseInstanceNorm):
    """Instance norm per (sample, channel) over the active sites of x [B, C, D, H, W] (AnatoMask)."""

    _spatial_dims = 3


class SparseGroupNorm(nn.Module):
    """Group norm per (sample, group) over the active sites; x [B, C, *S], affine [C] as nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.backend = backend
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"SparseGroupNorm: num_groups must be a positive int, got {num_groups!r}")
        if num_channels % num_groups:
            raise ValueError(f"SparseGroupNorm: num_groups must divide num_channels={num_channels}, got {num_groups}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        check_norm_eps(type(self).__name__, eps)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x [B, C, *S], mask bool [B, 1, *S]) -> [B, C, *S]; or SparseTensor -> SparseTensor."""
        if _compact_input(self, x, mask, self.num_channels, (2, 3)):
            return x.replace_features(FC.compact_group_norm(x.features, x.coords[:, 0], x.batch_size, self.num_groups,
                                                            self.weight, self.bias, self.eps, backend=self.backend))
        return F.sparse_group_norm(x, mask, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class SparseLayerNorm(nn.LayerNorm):
    """Layer norm over the channels of each active site (SparK's ConvNeXt LayerNorm).

    data_format ``"channels_first"``: x [B, C, *S], mask [B, 1, *S];
    ``"channels_last"``: x [B, *S, C], mask [B, *S, 1]. Inactive sites are 0.
    A SparseTensor (features [N, C]) ignores data_format.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last", device=None,
                 dtype=None):
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"SparseLayerNorm: data_format must be 'channels_last' or 'channels_first', "
                             f"got {data_format!r}")
        check_norm_eps(type(self).__name__, eps)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        self.data_format = data_format

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """Masked-dense (x, mask) -> x's layout; or SparseTensor -> SparseTensor."""
        if _compact_input(self, x, mask, self.normalized_shape[0], (2, 3)):
            return x.replace_features(FC.compact_layer_norm(x.features, self.weight, self.bias, self.eps))
        return F.sparse_layer_norm(x, mask, self.weight, self.bias, self.eps,
                                   channels_last=self.data_format == "channels_last")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", data_format={self.data_format}"
