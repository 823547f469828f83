"""Building blocks of the sparse encoders, on either layout.

``block(x, mask)``: x masked-dense [B, C, *S] (exactly 0 where mask is False), mask
bool [B, 1, *S]. ``block(st)``: a compact :class:`tcm_kernels.SparseTensor`, whose
convs and norms keep its rows, so activations and residual adds act on the feature
rows only. The layers are thin: the work is in tcm_kernels (submanifold conv,
sparse downsample, sparse norms); each layer keeps the parameters a dense twin would
have, so :func:`tcm_mim.models.export_dense` can copy them into plain torch layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import tcm_kernels.nn as tnn
from tcm_kernels import SparseTensor

Features = torch.Tensor | SparseTensor

NORMS = ("batch", "instance", "layer")


def make_norm(kind: str, channels: int, dim: int) -> nn.Module:
    """Sparse norm of ``kind`` over ``channels`` for a ``dim``-D layout (forward(x, mask))."""
    if kind == "batch":
        return (tnn.SparseBatchNorm2d if dim == 2 else tnn.SparseBatchNorm3d)(channels)
    if kind == "instance":
        return (tnn.SparseInstanceNorm2d if dim == 2 else tnn.SparseInstanceNorm3d)(channels, affine=True)
    if kind == "layer":
        return tnn.SparseLayerNorm(channels, data_format="channels_first")
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def make_conv(cin: int, cout: int, k: int, dim: int, *, groups: int = 1, bias: bool = False) -> nn.Module:
    return (tnn.SubMConv2d if dim == 2 else tnn.SubMConv3d)(cin, cout, k, groups=groups, bias=bias)


def make_down(cin: int, cout: int, stride: int, dim: int) -> nn.Module:
    return (tnn.SparseDownsample2d if dim == 2 else tnn.SparseDownsample3d)(cin, cout, stride)


def apply(layer: nn.Module, x: Features, mask: torch.Tensor | None) -> Features:
    """``layer`` on either layout: layer(x, mask) when masked-dense, layer(x) for a SparseTensor (mask None)."""
    return layer(x) if mask is None else layer(x, mask)


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: Features) -> Features:
    """A site-wise function with fn(0) = 0 (ReLU, GELU): on the feature rows of a SparseTensor, else on x."""
    return x.replace_features(fn(x.features)) if isinstance(x, SparseTensor) else fn(x)


def relu_after_norm(x: Features) -> Features:
    """ReLU; in place on the rows of a SparseTensor coming out of a norm (nothing saves a norm's output for
    backward, so this spares a full-size allocation per layer)."""
    return x.replace_features(torch.relu_(x.features)) if isinstance(x, SparseTensor) else torch.relu(x)


def add_relu(x: Features, skip: Features) -> Features:
    """relu(x + skip); the residual of a SparseTensor has the same rows (a conv keeps its input's rows)."""
    if isinstance(x, SparseTensor):
        return x.replace_features(torch.relu_(x.features + skip.features))  # add's backward needs no output
    return torch.relu(x + skip)


class ConvNormAct(nn.Module):
    """submanifold conv -> sparse norm -> ReLU (optional)."""

    def __init__(self, cin: int, cout: int, k: int, dim: int, norm: str, act: bool = True):
        super().__init__()
        self.conv = make_conv(cin, cout, k, dim)
        self.norm = make_norm(norm, cout, dim)
        self.act = act

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        x = apply(self.norm, apply(self.conv, x, mask), mask)
        return relu_after_norm(x) if self.act else x  # relu(0) = 0: inactive sites stay 0


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3^d submanifold convs and an identity (or 1^d projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, dim: int, norm: str):
        super().__init__()
        cout = width * self.expansion
        self.a = ConvNormAct(cin, width, 3, dim, norm)
        self.b = ConvNormAct(width, cout, 3, dim, norm, act=False)
        self.shortcut = None if cin == cout else ConvNormAct(cin, cout, 1, dim, norm, act=False)

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        skip = x if self.shortcut is None else self.shortcut(x, mask)
        return add_relu(self.b(self.a(x, mask), mask), skip)


class Bottleneck(nn.Module):
    """ResNet-50 block: 1^d reduce, 3^d, 1^d expand (x4)."""

    expansion = 4

    def __init__(self, cin: int, width: int, dim: int, norm: str):
        super().__init__()
        cout = width * self.expansion
        self.a = ConvNormAct(cin, width, 1, dim, norm)
        self.b = ConvNormAct(width, width, 3, dim, norm)
        self.c = ConvNormAct(width, cout, 1, dim, norm, act=False)
        self.shortcut = None if cin == cout else ConvNormAct(cin, cout, 1, dim, norm, act=False)

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        skip = x if self.shortcut is None else self.shortcut(x, mask)
        return add_relu(self.c(self.b(self.a(x, mask), mask), mask), skip)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on sparse sites: depthwise 7^d, channel LayerNorm, 1^d MLP (x4), residual."""

    expansion = 1

    def __init__(self, cin: int, width: int, dim: int, norm: str = "layer", kernel: int = 7):
        super().__init__()
        if cin != width:
            raise ValueError(f"ConvNeXtBlock keeps the width: cin {cin} != width {width}")
        self.dw = make_conv(width, width, kernel, dim, groups=width, bias=True)
        self.norm = make_norm(norm, width, dim)
        self.fc1 = make_conv(width, 4 * width, 1, dim, bias=True)
        self.fc2 = make_conv(4 * width, width, 1, dim, bias=True)

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        y = apply(self.norm, apply(self.dw, x, mask), mask)
        y = apply(self.fc2, pointwise(nn.functional.gelu, apply(self.fc1, y, mask)), mask)  # gelu(0) = 0
        return x.replace_features(x.features + y.features) if isinstance(x, SparseTensor) else x + y


class Stem(nn.Module):
    """Patchify stem: sparse downsample by ``stride`` (kernel = stride), then a norm and ReLU.

    The image comes masked-dense; ``compact=True`` turns the downsampled features into
    a SparseTensor (the encoder's first stage runs on it) and returns it with mask None.
    """

    def __init__(self, cin: int, cout: int, stride: int, dim: int, norm: str):
        super().__init__()
        self.down = make_down(cin, cout, stride, dim)
        self.norm = make_norm(norm, cout, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                compact: bool = False) -> tuple[Features, torch.Tensor | None]:
        x, mask = self.down(x, mask)
        if compact:
            x, mask = SparseTensor.from_dense(x, mask), None
        return relu_after_norm(apply(self.norm, x, mask)), mask


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with inactive sites zeroed (the input image of a sparse encoder)."""
    return x * mask.to(x.dtype)

