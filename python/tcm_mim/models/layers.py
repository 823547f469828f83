"""Building blocks of the sparse encoders, on either layout.

``block(x, mask)``: x masked-dense [B, C, *S] (exactly 0 where mask is False), mask
bool [B, 1, *S]. ``block(st)``: a compact :class:`tcm_kernels.SparseTensor`, whose
convs and norms keep its rows, so activations and residual adds act on the feature
rows only. The layers are thin: the work is in tcm_kernels (submanifold conv,
sparse downsample, sparse norms); each layer keeps the parameters a dense twin would
have, so :func:`tcm_mim.models.export_dense` can copy them into plain torch layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import tcm_kernels.nn as tnn
from tcm_kernels import SparseTensor
from tcm_kernels.ops.weight_layout import cached_weight

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


def make_down(cin: int, cout: int, stride: int, dim: int, *, bias: bool = True) -> nn.Module:
    return (tnn.SparseDownsample2d if dim == 2 else tnn.SparseDownsample3d)(cin, cout, stride, bias=bias)


def coarse_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """bool [B, 1, *S] -> bool [B, 1, *S / stride]: a coarse site is active if any of its children is (SparK)."""
    pool = F.max_pool2d if mask.dim() == 4 else F.max_pool3d
    return pool(mask.to(torch.float32), stride) > 0  # float: CUDA's max-pool has no integer kernels


def _window_rows(x: SparseTensor, out: SparseTensor, kernel: int, stride: int) -> torch.Tensor:
    """[N_out, K] rows of ``x`` under each output site's kernel window (K = kernel^d, offsets in row-major
    order, padding kernel // 2); ``x.features.shape[0]`` where the window holds no active site (a zero row)."""
    grid = x.kernel_map().grid
    n_in, pad = x.features.shape[0], kernel // 2
    base = out.coords.long()
    rows = []
    for offset in itertools.product(range(kernel), repeat=x.ndim):
        pos = [base[:, 1 + a] * stride + o - pad for a, o in enumerate(offset)]
        inside = torch.ones_like(base[:, 0], dtype=torch.bool)
        for p, size in zip(pos, x.spatial_shape):
            inside &= (p >= 0) & (p < size)
        idx = grid[(base[:, 0], *(p.clamp(0, size - 1) for p, size in zip(pos, x.spatial_shape)))].long()
        rows.append(torch.where(inside & (idx >= 0), idx, n_in))
    return torch.stack(rows, 1)


def _windows(x: SparseTensor, kernel: int, stride: int) -> tuple[torch.Tensor, SparseTensor]:
    """(features under each coarse site's window [N_out, K, C], zero where inactive; the coarse sites)."""
    out, _ = x.coarsen(stride)
    rows = _window_rows(x, out, kernel, stride)
    padded = torch.cat([x.features, x.features.new_zeros((1, x.features.shape[1]))])
    return padded[rows], out


class SparseStridedConv(nn.Module):
    """Strided conv (kernel ``k``^d, padding k // 2, no bias) on sparse features, as SparK computes it: the
    dense conv of the masked input, kept at the coarse sites with an active child (:func:`coarse_mask`).

    ``forward(x, mask) -> (y [B, Cout, *S / stride], coarse mask)`` on masked-dense input (dense conv, the
    dense emulation); ``forward(st) -> SparseTensor`` on the coarse sites: each output row gathers its
    window's input rows (zero rows for inactive sites) and one GEMM applies the weight: no dense tensor.
    The weight has a dense conv's shape [Cout, Cin, k, ..., k], so it exports as ``nn.Conv{d}d``.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, dim: int):
        super().__init__()
        self.kernel, self.stride, self.dim = kernel, stride, dim
        self.weight = nn.Parameter(torch.empty(cout, cin, *(kernel,) * dim))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # as torchvision / timm ResNets

    def forward(self, x: Features, mask: torch.Tensor | None = None):
        """(x, mask) -> (y, coarse mask) masked-dense; or SparseTensor -> SparseTensor."""
        if isinstance(x, SparseTensor):
            cols, out = _windows(x, self.kernel, self.stride)
            # columns in (offset, cin) order: on the CPU a view of the cached GEMM layout, no copy per call
            w = cached_weight(self.weight, 1).movedim(1, -1).reshape(self.weight.shape[0], -1)
            return out.replace_features(cols.reshape(cols.shape[0], -1) @ w.t())
        conv = F.conv2d if self.dim == 2 else F.conv3d
        out_mask = coarse_mask(mask, self.stride)
        y = conv(x, self.weight, stride=self.stride, padding=self.kernel // 2)
        return y * out_mask.to(y.dtype), out_mask

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={self.kernel}, stride={self.stride}, "
                f"dim={self.dim}")


class SparseMaxPool(nn.Module):
    """SparK's sparse max-pool (kernel ``k``, stride ``s``, padding k // 2) of non-negative features (after a
    ReLU): inactive sites count as 0, which a non-negative window maximum equals to ignoring them.

    ``forward(x, mask) -> (y, coarse mask)`` masked-dense; ``forward(st) -> SparseTensor`` on the coarse sites.
    """

    def __init__(self, kernel: int, stride: int, dim: int):
        super().__init__()
        self.kernel, self.stride, self.dim = kernel, stride, dim

    def forward(self, x: Features, mask: torch.Tensor | None = None):
        """(x, mask) -> (y, coarse mask) masked-dense; or SparseTensor -> SparseTensor."""
        if isinstance(x, SparseTensor):
            cols, out = _windows(x, self.kernel, self.stride)
            return out.replace_features(cols.amax(1))
        pool = F.max_pool2d if self.dim == 2 else F.max_pool3d
        out_mask = coarse_mask(mask, self.stride)
        return pool(x, self.kernel, self.stride, self.kernel // 2) * out_mask.to(x.dtype), out_mask

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel}, stride={self.stride}, dim={self.dim}"


def drop_path(x: Features, p: float, training: bool) -> Features:
    """Stochastic depth: zero the residual branch of a whole sample with probability ``p`` (scaling the kept
    ones by 1 / (1 - p)), as timm's ``DropPath``; identity in eval mode or when p = 0."""
    if p == 0 or not training:
        return x
    if isinstance(x, SparseTensor):
        keep = x.features.new_empty(x.batch_size).bernoulli_(1 - p).div_(1 - p)
        return x.replace_features(x.features * keep[x.coords[:, 0].long()].unsqueeze(1))
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p).div_(1 - p)
    return x * keep


def unpack(y, mask: torch.Tensor | None) -> tuple[Features, torch.Tensor | None]:
    """The output of a layer that may change the sites: (y, new mask) from a masked-dense (or exported) layer's
    tuple, (y, mask) otherwise (a SparseTensor carries its sites)."""
    return y if isinstance(y, tuple) else (y, mask)


def apply(layer: nn.Module, x: Features, mask: torch.Tensor | None) -> Features:
    """``layer`` on either layout: layer(x, mask) when masked-dense, layer(x) for a SparseTensor (mask None)."""
    return layer(x) if mask is None else layer(x, mask)


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: Features) -> Features:
    """A site-wise function with fn(0) = 0 (ReLU, GELU): on the feature rows of a SparseTensor, else on x."""
    return x.replace_features(fn(x.features)) if isinstance(x, SparseTensor) else fn(x)


def _act(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """ReLU, or leaky ReLU (nnU-Net's, slope 0.01) when ``negative_slope`` > 0: both map 0 to 0."""
    return F.leaky_relu(x, negative_slope) if negative_slope else torch.relu(x)


def _act_(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """:func:`_act` in place."""
    return F.leaky_relu_(x, negative_slope) if negative_slope else torch.relu_(x)


def relu_after_norm(x: Features, negative_slope: float = 0.0) -> Features:
    """ReLU (leaky when ``negative_slope`` > 0); in place on the rows of a SparseTensor coming out of a norm
    (nothing saves a norm's output for backward, so this spares a full-size allocation per layer)."""
    if isinstance(x, SparseTensor):
        return x.replace_features(_act_(x.features, negative_slope))
    return _act(x, negative_slope)


def add_relu(x: Features, skip: Features, negative_slope: float = 0.0) -> Features:
    """relu(x + skip) (leaky when ``negative_slope`` > 0); the residual of a SparseTensor has the same rows
    (a conv keeps its input's rows)."""
    if isinstance(x, SparseTensor):  # add's backward needs no output: the activation may run in place
        return x.replace_features(_act_(x.features + skip.features, negative_slope))
    return _act(x + skip, negative_slope)


class ConvNormAct(nn.Module):
    """conv -> sparse norm -> ReLU (optional; leaky when ``negative_slope`` > 0). The conv is submanifold
    (stride 1) or, with ``stride`` > 1, a :class:`SparseStridedConv` whose output lives on the coarse sites."""

    def __init__(self, cin: int, cout: int, k: int, dim: int, norm: str, act: bool = True, stride: int = 1,
                 negative_slope: float = 0.0):
        super().__init__()
        self.conv = make_conv(cin, cout, k, dim) if stride == 1 else SparseStridedConv(cin, cout, k, stride, dim)
        self.norm = make_norm(norm, cout, dim)
        self.act, self.negative_slope = act, negative_slope

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        x, mask = unpack(apply(self.conv, x, mask), mask)
        x = apply(self.norm, x, mask)
        return relu_after_norm(x, self.negative_slope) if self.act else x  # act(0) = 0: inactive sites stay 0


class _ResidualBlock(nn.Module):
    """A residual block: ``branch`` (ConvNormAct layers, the first one strided when ``stride`` > 1), then
    drop path, the shortcut (identity, or a 1^d conv + norm of that stride: a projection) and ReLU."""

    expansion = 1

    def __init__(self, cin: int, cout: int, dim: int, norm: str, stride: int, drop_path: float,
                 negative_slope: float = 0.0):
        super().__init__()
        self.stride, self.drop_path, self.negative_slope = stride, drop_path, negative_slope
        self.shortcut = None if cin == cout and stride == 1 else \
            ConvNormAct(cin, cout, 1, dim, norm, act=False, stride=stride)

    def branch(self, x: Features, mask: torch.Tensor | None, out_mask: torch.Tensor | None) -> Features:
        raise NotImplementedError

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        out_mask = coarse_mask(mask, self.stride) if mask is not None and self.stride > 1 else mask
        skip = x if self.shortcut is None else self.shortcut(x, mask)
        y = drop_path(self.branch(x, mask, out_mask), self.drop_path, self.training)
        return add_relu(y, skip, self.negative_slope)


class BasicBlock(_ResidualBlock):
    """ResNet-18/34 block: two 3^d convs (the first of stride ``stride``) and an identity or projection shortcut;
    ``negative_slope`` > 0 makes its activations leaky (nnU-Net's residual encoders: 0.01)."""

    expansion = 1

    def __init__(self, cin: int, width: int, dim: int, norm: str, stride: int = 1, drop_path: float = 0.0,
                 negative_slope: float = 0.0):
        super().__init__(cin, width * self.expansion, dim, norm, stride, drop_path, negative_slope)
        self.a = ConvNormAct(cin, width, 3, dim, norm, stride=stride, negative_slope=negative_slope)
        self.b = ConvNormAct(width, width * self.expansion, 3, dim, norm, act=False)

    def branch(self, x, mask, out_mask):
        return self.b(self.a(x, mask), out_mask)


class Bottleneck(_ResidualBlock):
    """ResNet-50 block (torchvision / timm "v1.5"): 1^d reduce, 3^d of stride ``stride``, 1^d expand (x4)."""

    expansion = 4

    def __init__(self, cin: int, width: int, dim: int, norm: str, stride: int = 1, drop_path: float = 0.0,
                 negative_slope: float = 0.0):
        super().__init__(cin, width * self.expansion, dim, norm, stride, drop_path, negative_slope)
        self.a = ConvNormAct(cin, width, 1, dim, norm, negative_slope=negative_slope)
        self.b = ConvNormAct(width, width, 3, dim, norm, stride=stride, negative_slope=negative_slope)
        self.c = ConvNormAct(width, width * self.expansion, 1, dim, norm, act=False)

    def branch(self, x, mask, out_mask):
        return self.c(self.b(self.a(x, mask), mask), out_mask)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on sparse sites: depthwise 7^d, channel LayerNorm, 1^d MLP (x4), residual."""

    expansion = 1

    def __init__(self, cin: int, width: int, dim: int, norm: str = "layer", kernel: int = 7, drop_path: float = 0.0):
        super().__init__()
        if cin != width:
            raise ValueError(f"ConvNeXtBlock keeps the width: cin {cin} != width {width}")
        self.drop_path = drop_path
        self.dw = make_conv(width, width, kernel, dim, groups=width, bias=True)
        self.norm = make_norm(norm, width, dim)
        self.fc1 = make_conv(width, 4 * width, 1, dim, bias=True)
        self.fc2 = make_conv(4 * width, width, 1, dim, bias=True)

    def forward(self, x: Features, mask: torch.Tensor | None = None) -> Features:
        y = apply(self.norm, apply(self.dw, x, mask), mask)
        y = apply(self.fc2, pointwise(nn.functional.gelu, apply(self.fc1, y, mask)), mask)  # gelu(0) = 0
        y = drop_path(y, self.drop_path, self.training)
        return x.replace_features(x.features + y.features) if isinstance(x, SparseTensor) else x + y


class PatchifyStem(nn.Module):
    """Patchify stem: sparse downsample by ``stride`` (kernel = stride, no bias: a norm follows), norm, ReLU.

    The image comes masked-dense; ``compact=True`` turns the downsampled features into
    a SparseTensor (the encoder's first stage runs on it) and returns it with mask None.
    """

    def __init__(self, cin: int, cout: int, stride: int, dim: int, norm: str):
        super().__init__()
        self.down = make_down(cin, cout, stride, dim, bias=False)
        self.norm = make_norm(norm, cout, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                compact: bool = False) -> tuple[Features, torch.Tensor | None]:
        x, mask = self.down(x, mask)
        if compact:
            x, mask = SparseTensor.from_dense(x, mask), None
        return relu_after_norm(apply(self.norm, x, mask)), mask


class ResNetStem(nn.Module):
    """ResNet's stem: 7^d conv of stride 2 (no bias), norm, ReLU, sparse 3^d max-pool of stride 2 (SparK).

    The conv runs dense on the masked image (SparK's way: the input has ``cin`` channels only) and is
    kept at the active sites of the stride-2 grid; ``compact=True`` continues on a SparseTensor from there.
    """

    stride = 4

    def __init__(self, cin: int, cout: int, dim: int, norm: str):
        super().__init__()
        self.conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(cin, cout, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.norm = make_norm(norm, cout, dim)
        self.pool = SparseMaxPool(3, 2, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                compact: bool = False) -> tuple[Features, torch.Tensor | None]:
        x = self.conv(x)
        if mask is not None:  # None: the dense export, every site active
            mask = coarse_mask(mask, 2)
            x = x * mask.to(x.dtype)
            if compact:
                x, mask = SparseTensor.from_dense(x, mask), None
        x = relu_after_norm(apply(self.norm, x, mask))
        return unpack(apply(self.pool, x, mask), mask)


class ConvStem(nn.Module):
    """nnU-Net's residual-encoder stem: one 3^d submanifold conv at full resolution (stride 1, no bias: a norm
    follows), norm, (leaky) ReLU.

    The image comes masked-dense; ``compact=True`` turns it into a SparseTensor of its active voxels
    (``cin`` channels) first, so the conv already runs on the active rows only.
    """

    stride = 1

    def __init__(self, cin: int, cout: int, dim: int, norm: str, negative_slope: float = 0.0):
        super().__init__()
        self.conv = ConvNormAct(cin, cout, 3, dim, norm, negative_slope=negative_slope)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                compact: bool = False) -> tuple[Features, torch.Tensor | None]:
        if compact:
            x, mask = SparseTensor.from_dense(x, mask), None
        return self.conv(x, mask), mask


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with inactive sites zeroed (the input image of a sparse encoder)."""
    return x * mask.to(x.dtype)

