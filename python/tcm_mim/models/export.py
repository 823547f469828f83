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

from .layers import SparseMaxPool, SparseStridedConv


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
    bias = getattr(src, "bias", None) is not None
    conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(src.weight.shape[1] * kw.get("groups", 1), src.weight.shape[0],
                                                 tuple(src.weight.shape[2:]), bias=bias, **kw)
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
    if isinstance(m, SparseStridedConv):
        return _MaskFree(_conv_like(m, m.dim, stride=m.stride, padding=m.kernel // 2), returns_mask=True)
    if isinstance(m, SparseMaxPool):
        pool = nn.MaxPool2d if m.dim == 2 else nn.MaxPool3d
        return _MaskFree(pool(m.kernel, m.stride, m.kernel // 2), returns_mask=True)
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
            setattr(module, name, twin.train(child.training))  # keep eval-mode norms in eval mode
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
    return DenseEncoder(dense).train(encoder.training)


# Our module names -> torchvision's / timm's ResNet names (both use the same ones).
_RESNET_NAMES = {"a.conv": "conv1", "a.norm": "bn1", "b.conv": "conv2", "b.norm": "bn2", "c.conv": "conv3",
                 "c.norm": "bn3", "shortcut.conv": "downsample.0", "shortcut.norm": "downsample.1"}


def export_resnet_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a standard 2-D sparse ResNet (``build_encoder("resnet18" | "resnet50" | ...)``, batch norm)
    under torchvision's / timm's ResNet names: ``conv1``, ``bn1``, ``layer{1-4}.{j}.conv1 / bn1 / ... /
    downsample.{0,1}``, running statistics included.

    It loads with ``strict=True`` into ``timm.create_model("resnet50", in_chans=C, num_classes=0)`` and into
    torchvision's ``resnet50()`` once its ``fc`` is replaced by ``nn.Identity()`` (no classifier is
    pretrained) and, for C != 3, its ``conv1`` by a C-channel one. Tensors are detached copies.
    """
    from .encoders import SparseResNet
    from .layers import ResNetStem

    if not (isinstance(encoder, SparseResNet) and isinstance(encoder.stem, ResNetStem)
            and isinstance(encoder.stem.norm, tnn.SparseBatchNorm2d)):
        raise ValueError("export_resnet_state_dict: encoder must be a 2-D SparseResNet with the ResNet stem and batch "
                         f"norm (resnet18, resnet50, resnet_tiny), got {type(encoder).__name__} with stem "
                         f"{type(getattr(encoder, 'stem', None)).__name__}")
    out = {}
    for name, value in encoder.state_dict().items():
        if name.startswith("stem."):
            part, _, leaf = name[len("stem."):].partition(".")
            out[f"{ {'conv': 'conv1', 'norm': 'bn1'}[part] }.{leaf}"] = value.detach().clone()
            continue
        _, stage, block, rest = name.split(".", 3)  # stages.{i}.{j}.{a.conv.weight}
        layer, _, leaf = rest.rpartition(".")
        out[f"layer{int(stage) + 1}.{block}.{_RESNET_NAMES[layer]}.{leaf}"] = value.detach().clone()
    return out
