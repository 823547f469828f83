"""Sparse encoders (SparK): ResNet-style 2D/3D and a ConvNeXt-style depthwise variant.

forward(x, mask) -> [(features_i, mask_i)] per stage, features masked-dense
[B, C_i, *S / stride_i], mask_i bool [B, 1, *S / stride_i]. ``downsample_ratio`` is
the stride of the last stage: the patch size of the MIM mask at image level.

Inside, the stages run on one of two layouts (same numbers, tested):

* compact (default): after the stem and after every downsample the features are a
  :class:`tcm_kernels.SparseTensor` (rows = active sites only); convs, norms, ReLU /
  GELU and residual adds touch those rows only, and each stage's output is scattered
  back to masked-dense once.
* masked-dense, when the encoder's ``backend`` is ``"reference"`` (set by
  :func:`tcm_mim.models.set_backend`): every layer works on x [B, C, *S] with the
  mask, SparK's dense emulation and the baseline of the benchmarks. Also when a layer
  was swapped for one that takes only (x, mask) (the dense export, test emulations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import tcm_kernels.nn as tnn

from .layers import (BasicBlock, Bottleneck, ConvNeXtBlock, ConvNormAct, ConvStem, PatchifyStem, ResNetStem,
                     SparseMaxPool, SparseStridedConv, apply, coarse_mask, make_down, make_norm)

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class _StagedEncoder(nn.Module):
    """Stem, then stages; the stride-2 steps between stages are separate layers (``downs``) or the first
    block of a stage (a block with ``stride`` 2)."""

    stem: nn.Module
    downs: nn.ModuleList
    stages: nn.ModuleList

    def __init__(self, stem_stride: int, norm: str):
        super().__init__()
        self.stem_stride = stem_stride
        self.norm = norm  # the kind of the encoder's norms (SparKMIM's densify norms follow it)
        self.backend: str | None = None  # "reference": masked-dense layout throughout (see the module docstring)

    @property
    def downsample_ratio(self) -> int:
        return self.stem_stride * 2 ** (len(self.stages) - 1)

    def runs_compact(self) -> bool:
        """Whether forward runs the stages on the compact layout."""
        return self.backend != "reference" and all(isinstance(m, _COMPACT_READY) for m in self.modules())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """x [B, C_in, *S] with inactive sites 0, mask bool [B, 1, *S] -> [(features_i, mask_i)] per stage."""
        compact = mask is not None and self.runs_compact()
        x, mask = self.stem(x, mask, compact=compact)
        out = []
        for i, stage in enumerate(self.stages):
            if i > 0 and len(self.downs):
                if compact:
                    x = self.downs[i - 1](x)  # a new SparseTensor on the coarser grid
                else:
                    x, mask = self.downs[i - 1](x, mask)
            for block in stage:
                x = block(x, mask)
                stride = getattr(block, "stride", 1)
                if mask is not None and stride > 1:  # the block's output lives on the coarser grid
                    mask = coarse_mask(mask, stride)
            out.append(x.dense() if compact else (x, mask))
        return out


def _drop_path_rates(drop_path: float, blocks: int, owner: str) -> list[float]:
    """timm's stochastic-depth rule: rates growing linearly from 0 at the first block to ``drop_path`` at the last."""
    if not 0 <= drop_path < 1:
        raise ValueError(f"{owner}: drop_path must be in [0, 1), got {drop_path}")
    return torch.linspace(0, drop_path, blocks).tolist() if blocks > 1 else [drop_path]


_STEM_STRIDES = {"resnet": ResNetStem.stride, "conv": ConvStem.stride, "patchify": None}  # None: stem_stride


class SparseResNet(_StagedEncoder):
    """ResNet sparse encoder (2D or 3D).

    ``stem="resnet"`` is the standard ResNet (He et al. 2016; torchvision's and timm's ``resnet18`` /
    ``resnet50``): 7^d stride-2 conv + norm + ReLU + 3^d stride-2 sparse max-pool, the first block of
    stages 2-4 strided (the 3^d conv; 1^d stride-2 projection shortcut), no bias before a norm. Its 2-D
    batch-norm weights load into torchvision's / timm's ResNet (:func:`tcm_mim.models.export_resnet_state_dict`).

    ``stem="patchify"``: a ``stem_stride`` patchify stem (kernel = stride) and separate stride-2 sparse
    downsampling layers between stages (SparK's ConvNeXt design on ResNet blocks): every layer runs on the
    compact layout, and ``stem_stride`` 2 gives the small patches of the tiny 3-D encoders.

    ``stem="conv"``: nnU-Net's residual encoder (ResEnc, Isensee et al. 2024) / STU-Net: one 3^d conv + norm +
    activation at full resolution (stride 1), a full-resolution first stage, and the first block of every later
    stage strided (3^d stride-2 conv; 1^d stride-2 conv + norm projection shortcut). Every layer, the stem's
    conv included, runs on the compact layout. Downsample ratio 2^(stages - 1).

    Args:
        dim: 2 or 3 spatial dims.
        in_channels: image channels.
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50).
        depths, widths: blocks and width per stage (output channels = width * expansion).
        stem: ``"resnet"``, ``"patchify"`` or ``"conv"``.
        stem_stride: the patchify stem's stride (the ResNet stem's is 4: conv /2, max-pool /2; the conv stem's 1).
        norm: ``"batch"`` (SparK), ``"instance"`` (AnatoMask / nnU-Net 3D) or ``"layer"``.
        drop_path: stochastic depth of the last block, growing linearly from 0 at the first (timm's rule;
            SparK pretrains ResNet-50 with 0.05).
        negative_slope: 0 for ReLU; > 0 for leaky ReLU (nnU-Net: 0.01).
    """

    def __init__(self, dim: int = 2, in_channels: int = 1, block: str = "basic", depths: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512), stem: str = "resnet", stem_stride: int = 4,
                 norm: str = "batch", drop_path: float = 0.0, negative_slope: float = 0.0):
        if stem not in _STEM_STRIDES:
            raise ValueError(f"SparseResNet: stem must be one of {tuple(_STEM_STRIDES)}, got {stem!r}")
        if not 0 <= negative_slope < 1:
            raise ValueError(f"SparseResNet: negative_slope must be in [0, 1), got {negative_slope}")
        super().__init__(_STEM_STRIDES[stem] or stem_stride, norm)
        if dim not in (2, 3):
            raise ValueError(f"SparseResNet: dim must be 2 or 3, got {dim}")
        if block not in BLOCKS or len(depths) != len(widths) or not depths:
            raise ValueError(f"SparseResNet: block in {tuple(BLOCKS)}, depths and widths of one length; "
                             f"got {block!r}, {depths}, {widths}")
        rates = _drop_path_rates(drop_path, sum(depths), "SparseResNet")
        cls = BLOCKS[block]
        if stem == "resnet":
            self.stem = ResNetStem(in_channels, widths[0], dim, norm)
        elif stem == "conv":
            self.stem = ConvStem(in_channels, widths[0], dim, norm, negative_slope)
        else:
            self.stem = PatchifyStem(in_channels, widths[0], stem_stride, dim, norm)
        self.downs, self.stages, self.channels = nn.ModuleList(), nn.ModuleList(), []
        cin = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            if i > 0 and stem == "patchify":
                self.downs.append(make_down(cin, cin, 2, dim, bias=False))  # a conv follows: no bias needed
            blocks = []
            for j in range(depth):
                stride = 2 if stem != "patchify" and i > 0 and j == 0 else 1
                blocks.append(cls(cin, width, dim, norm, stride=stride, drop_path=rates.pop(0),
                                  negative_slope=negative_slope))
                cin = width * cls.expansion
            self.stages.append(nn.ModuleList(blocks))
            self.channels.append(cin)


class _NormDown(nn.Module):
    """ConvNeXt's downsampling layer: norm, then a stride-2 sparse downsample."""

    def __init__(self, cin: int, cout: int, dim: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, cin, dim)
        self.down = make_down(cin, cout, 2, dim)

    def forward(self, x, mask: torch.Tensor | None = None):
        """(x, mask) -> (y, mask_out) masked-dense; or SparseTensor -> SparseTensor."""
        return apply(self.down, apply(self.norm, x, mask), mask)


class SparseConvNeXt(_StagedEncoder):
    """ConvNeXt-style sparse encoder: depthwise 7^d submanifold convs and channel LayerNorm; ``drop_path`` as
    :class:`SparseResNet`'s."""

    def __init__(self, dim: int = 2, in_channels: int = 1, depths: Sequence[int] = (2, 2, 6, 2),
                 widths: Sequence[int] = (48, 96, 192, 384), stem_stride: int = 4, kernel: int = 7,
                 drop_path: float = 0.0):
        super().__init__(stem_stride, "layer")
        rates = _drop_path_rates(drop_path, sum(depths), "SparseConvNeXt")
        self.stem = PatchifyStem(in_channels, widths[0], stem_stride, dim, "layer")
        self.downs = nn.ModuleList(_NormDown(widths[i - 1], widths[i], dim, "layer") for i in range(1, len(widths)))
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvNeXtBlock(w, w, dim, "layer", kernel, drop_path=rates.pop(0)) for _ in range(d))
            for d, w in zip(depths, widths))
        self.channels = list(widths)


# Modules that take a SparseTensor: the encoder's own blocks and tcm_kernels' layers.
_COMPACT_READY = (_StagedEncoder, nn.ModuleList, PatchifyStem, ResNetStem, ConvStem, nn.Conv2d, nn.Conv3d,
                  SparseMaxPool, SparseStridedConv, _NormDown, ConvNormAct, BasicBlock, Bottleneck, ConvNeXtBlock,
                  tnn.SubMConv2d, tnn.SubMConv3d, tnn.SparseDownsample2d, tnn.SparseDownsample3d,
                  tnn.SparseBatchNorm2d, tnn.SparseBatchNorm3d, tnn.SparseSyncBatchNorm, tnn.SparseInstanceNorm2d,
                  tnn.SparseInstanceNorm3d, tnn.SparseGroupNorm, tnn.SparseLayerNorm)

_CONFIGS = {
    "resnet18": dict(block="basic", depths=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet50": dict(block="bottleneck", depths=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
    "resnet_tiny": dict(block="basic", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
    "resnet3d": dict(block="basic", depths=(1, 1, 2, 2), widths=(32, 64, 128, 256), norm="instance", stem="patchify"),
    "resnet3d_tiny": dict(block="basic", depths=(1, 1, 1), widths=(8, 16, 32), norm="instance", stem="patchify",
                          stem_stride=2),
    # nnU-Net ResEnc M (Isensee et al. 2024, "nnU-Net Revisited"): 6 stages, full-resolution first stage,
    # instance norm, leaky ReLU 0.01; 32^3-voxel patches.
    "resenc3d": dict(block="basic", depths=(1, 3, 4, 6, 6, 6), widths=(32, 64, 128, 256, 320, 320), norm="instance",
                     stem="conv", stem_stride=1, negative_slope=0.01),
    # Its layout (6 stages, 32^3 patches) at test size: one block per stage, widths 4..32.
    "resenc3d_tiny": dict(block="basic", depths=(1, 1, 1, 1, 1, 1), widths=(4, 8, 16, 16, 32, 32), norm="instance",
                          stem="conv", stem_stride=1, negative_slope=0.01),
}
_CONVNEXT = {
    "convnext_tiny": dict(depths=(1, 1, 2, 1), widths=(16, 32, 64, 128)),
    "convnext_small": dict(depths=(2, 2, 6, 2), widths=(48, 96, 192, 384)),
}


ENCODERS = (*_CONFIGS, *_CONVNEXT)


def encoder_patch_size(name: str) -> int:
    """The patch side (total downsampling) of the encoder ``build_encoder(name)`` builds, without building it."""
    spec = {**_CONFIGS, **_CONVNEXT}.get(name)
    if spec is None:
        raise ValueError(f"encoder_patch_size: name must be one of {list(ENCODERS)}, got {name!r}")
    return spec.get("stem_stride", 4) * 2 ** (len(spec["depths"]) - 1)  # the ResNet stem's stride is 4


def build_encoder(name: str, dim: int = 2, in_channels: int = 1, **overrides) -> _StagedEncoder:
    """Encoder by name: resnet18, resnet50, resnet_tiny, resnet3d, resnet3d_tiny, resenc3d, resenc3d_tiny,
    convnext_tiny, convnext_small (``docs/encoders.md``); ``overrides`` replace the named configuration's
    arguments of :class:`SparseResNet` / :class:`SparseConvNeXt`."""
    if name in _CONFIGS:
        return SparseResNet(dim=dim, in_channels=in_channels, **{**_CONFIGS[name], **overrides})
    if name in _CONVNEXT:
        return SparseConvNeXt(dim=dim, in_channels=in_channels, **{**_CONVNEXT[name], **overrides})
    raise ValueError(f"build_encoder: name must be one of {sorted(_CONFIGS) + sorted(_CONVNEXT)}, got {name!r}")
