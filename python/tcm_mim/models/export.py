"""Dense export: the pretrained sparse encoder as plain torch layers with the same weights.

Every tcm_kernels layer is swapped for its dense twin (Conv with "same" padding,
strided Conv, BatchNorm / InstanceNorm, channel LayerNorm) inside a copy of the
encoder whose forward takes only the image. On an all-visible mask the sparse
encoder and its export agree (tested).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import tcm_kernels.nn as tnn


class _MaskFree(nn.Module):
    """Wraps a plain torch layer so it accepts (and ignores) the encoder's mask argument."""

    def __init__(self, layer: nn.Module, returns_mask: bool = False):
        super().__init__()
        self.layer, self.returns_mask = layer, returns_mask

    def forward(self, x: torch.Tensor, mask=None):
        y = self.layer(x)
        return (y, None) if self.returns_mask else y


class ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 of [B, C, *S] (ConvNeXt's channels-first norm)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.ln = ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.movedim(1, -1)).movedim(-1, 1)


def _conv_like(src: nn.Module, dim: int, **kw) -> nn.Module:
    conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(src.weight.shape[1] * kw.get("groups", 1), src.weight.shape[0],
                                                 tuple(src.weight.shape[2:]), bias=src.bias is not None, **kw)
    conv.load_state_dict({k: v for k, v in src.state_dict().items() if k in ("weight", "bias")})
    return conv


def _dense_twin(m: nn.Module) -> nn.Module | None:
    if isinstance(m, (tnn.SubMConv2d, tnn.SubMConv3d)):
        dim = m.weight.dim() - 2
        dil = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,) * dim
        pad = tuple(d * (k // 2) for d, k in zip(dil, m.weight.shape[2:]))
        return _MaskFree(_conv_like(m, dim, padding=pad, dilation=dil, groups=m.groups))
    if isinstance(m, (tnn.SparseDownsample2d, tnn.SparseDownsample3d)):
        dim = m.weight.dim() - 2
        return _MaskFree(_conv_like(m, dim, stride=m.weight.shape[2]), returns_mask=True)
    if isinstance(m, (tnn.SparseBatchNorm2d, tnn.SparseBatchNorm3d)):
        bn = (nn.BatchNorm2d if isinstance(m, tnn.SparseBatchNorm2d) else nn.BatchNorm3d)(
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict(m.state_dict())
        return _MaskFree(bn)
    if isinstance(m, (tnn.SparseInstanceNorm2d, tnn.SparseInstanceNorm3d)):
        cls = nn.InstanceNorm2d if isinstance(m, tnn.SparseInstanceNorm2d) else nn.InstanceNorm3d
        inorm = cls(m.num_features, m.eps, affine=m.affine)
        if m.affine:
            inorm.load_state_dict(m.state_dict())
        return _MaskFree(inorm)
    if isinstance(m, tnn.SparseLayerNorm):
        ln = nn.LayerNorm(m.normalized_shape, m.eps)
        ln.load_state_dict(m.state_dict())
        return _MaskFree(ChannelLayerNorm(ln))
    return None


def _swap(module: nn.Module) -> None:
    for name, child in module.named_children():
        twin = _dense_twin(child)
        if twin is not None:
            setattr(module, name, twin)
        else:
            _swap(child)


class DenseEncoder(nn.Module):
    """The exported encoder: ``forward(image) -> [features per stage]``, plain torch layers only."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [f for f, _ in self.encoder(image, None)]


def export_dense(encoder: nn.Module) -> DenseEncoder:
    """A dense copy of ``encoder`` (the original is untouched)."""
    dense = copy.deepcopy(encoder)
    _swap(dense)
    return DenseEncoder(dense)
