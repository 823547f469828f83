"""Modules over :func:`tcm_kernels.submanifold_conv` and :func:`tcm_kernels.sparse_downsample`.

Each accepts either layout and returns the same one:
``module(x, mask)`` on masked-dense tensors, or ``module(sparse_tensor)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.submconv import sparse_downsample, submanifold_conv
from ..sparse_tensor import SparseTensor


def _dense_args(op: str, x, mask):
    if isinstance(x, SparseTensor):
        if mask is not None:
            raise ValueError(f"{op}: pass either a SparseTensor or (x, mask), got a SparseTensor and a mask")
        return (*x.dense(), True)
    if mask is None:
        raise ValueError(f"{op}: mask must be a bool tensor [B, 1, *S] when x is masked-dense, got None")
    return x, mask, False


class _SubMConvNd(nn.Module):
    nd = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1, groups: int = 1,
                 bias: bool = True, patch_size: int | None = None, backend: str | None = None):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd, got {kernel_size}")
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
        xd, m, sparse = _dense_args(type(self).__name__, x, mask)
        y = submanifold_conv(xd, m, self.weight, self.bias, dilation=self.dilation, groups=self.groups,
                             patch_size=self.patch_size, backend=self.backend)
        if sparse:
            return SparseTensor.from_dense(y, m)
        return y

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
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(stride,) * self.nd))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _SubMConvNd.reset_parameters(self)

    def forward(self, x: torch.Tensor | SparseTensor, mask: torch.Tensor | None = None):
        """(x, mask) -> (y [B, Cout, *S/stride], mask_out); or SparseTensor -> SparseTensor."""
        xd, m, sparse = _dense_args(type(self).__name__, x, mask)
        y, mask_out = sparse_downsample(xd, m, self.weight, self.bias, stride=self.stride)
        if sparse:
            return SparseTensor.from_dense(y, mask_out)
        return y, mask_out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, bias={self.bias is not None}"


class SparseDownsample2d(_SparseDownsampleNd):
    """SparK's 2-D downsampling: kernel = stride, output mask = max-pool of the mask."""

    nd = 2


class SparseDownsample3d(_SparseDownsampleNd):
    """SparK's 3-D downsampling: kernel = stride, output mask = max-pool of the mask."""

    nd = 3
