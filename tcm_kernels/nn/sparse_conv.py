"""Modules over :func:`tcm_kernels.submanifold_conv` and :func:`tcm_kernels.sparse_downsample`.

Each accepts either layout and returns the same one:
``module(x, mask)`` on masked-dense tensors, or ``module(sparse_tensor)``. The SparseTensor
path stays compact (no dense round trip): a submanifold conv returns the input's coords, row
order, batch size and cached kernel map with new features; a downsample returns new coarse
coords (sorted) with their kernel map attached.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.downsample import sparse_downsample, sparse_downsample_compact
from ..ops.submconv import submanifold_conv
from ..ops.submconv_compact import submanifold_conv_compact
from ..ops._conv_checks import check_dilation
from ..sparse_tensor import SparseTensor


def _check_positive(op: str, **values: object) -> None:
    """Constructor arguments that must be positive ints (a 0 would fail later, in the weight init or forward)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def _check_layout(op: str, x, mask) -> bool:
    """True for a SparseTensor input, False for masked-dense (x, mask)."""
    if isinstance(x, SparseTensor):
        if mask is not None:
            raise ValueError(f"{op}: pass either a SparseTensor or (x, mask), got a SparseTensor and a mask")
        return True
    if mask is None:
        raise ValueError(f"{op}: mask must be a bool tensor [B, 1, *S] when x is masked-dense, got None")
    return False


class _SubMConvNd(nn.Module):
    nd = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1, groups: int = 1,
                 bias: bool = True, patch_size: int | None = None, backend: str | None = None):
        super().__init__()
        name = type(self).__name__
        _check_positive(name, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                        groups=groups)
        if kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd, got {kernel_size}")
        check_dilation(name, dilation, self.nd)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: in_channels {in_channels} and out_channels {out_channels} "
                             f"must be divisible by groups={groups}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.dilation, self.groups, self.patch_size, self.backend = dilation, groups, patch_size, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *(kernel_size,) * self.nd))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as torch.nn.ConvNd
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x [B, Cin, *S], mask bool [B, 1, *S]) -> y [B, Cout, *S]; or SparseTensor -> SparseTensor."""
        if _check_layout(type(self).__name__, x, mask):
            # patch_size is a masked-dense hint; the compact engine needs none.
            return x.replace_features(submanifold_conv_compact(x.features, x.kernel_map(), self.weight, self.bias,
                                                               dilation=self.dilation, groups=self.groups,
                                                               backend=self.backend))
        return submanifold_conv(x, mask, self.weight, self.bias, dilation=self.dilation, groups=self.groups,
                                patch_size=self.patch_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class SubMConv2d(_SubMConvNd):
    """Submanifold 2-D convolution: stride 1, same padding, outputs only at active sites."""

    nd = 2


class SubMConv3d(_SubMConvNd):
    """Submanifold 3-D convolution: stride 1, same padding, outputs only at active sites."""

    nd = 3


class _SparseDownsampleNd(nn.Module):
    nd = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, bias: bool = True):
        super().__init__()
        _check_positive(type(self).__name__, in_channels=in_channels, out_channels=out_channels, stride=stride)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(stride,) * self.nd))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _SubMConvNd.reset_parameters(self)

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x, mask) -> (y [B, Cout, *S/stride], mask_out); or SparseTensor -> SparseTensor."""
        if _check_layout(type(self).__name__, x, mask):
            return sparse_downsample_compact(x, self.weight, self.bias, stride=self.stride)
        return sparse_downsample(x, mask, self.weight, self.bias, stride=self.stride)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, bias={self.bias is not None}"


class SparseDownsample2d(_SparseDownsampleNd):
    """Patchify 2-D downsampling (SparK's ConvNeXt design): kernel = stride, output mask = max-pool of the mask."""

    nd = 2


class SparseDownsample3d(_SparseDownsampleNd):
    """Patchify 3-D downsampling (SparK's ConvNeXt design): kernel = stride, output mask = max-pool of the mask."""

    nd = 3
