"""SparK masked image modelling: sparse encoder, per-stage densify, light U-Net decoder.

The mask lives on the coarsest grid (one entry per image patch of
``encoder.downsample_ratio`` pixels/voxels a side); ``tcm_kernels.upsample_mask``
gives it at every scale. Any ``tcm_kernels.sample_mask`` strategy produces it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import tcm_kernels

from .layers import masked


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Run every tcm_kernels layer of ``model`` on ``backend``.

    ``"reference"`` is SparK's dense emulation: the encoder stays on the masked-dense
    layout and every layer runs its plain-PyTorch reference. Anything else (None =
    automatic) runs the encoder's stages on the compact layout.
    """
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _conv(dim: int):
    return nn.Conv2d if dim == 2 else nn.Conv3d


def _bn(dim: int):
    return nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d


class LightDecoder(nn.Module):
    """U-Net-style dense decoder: from the deepest stage up, x2 transposed conv, add the
    densified skip (projected to the width), 3^d conv + BN + ReLU; a final transposed conv
    back to image resolution and a 1^d conv to the image channels."""

    def __init__(self, dim: int, channels: list[int], width: int, out_channels: int, stem_stride: int):
        super().__init__()
        conv, bn = _conv(dim), _bn(dim)
        up = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        depth = len(channels)
        widths = [max(width // 2 ** i, 8) for i in range(depth)]  # deepest level first
        self.proj = nn.ModuleList(conv(c, w, 1) for c, w in zip(reversed(channels), widths))
        self.up = nn.ModuleList(up(widths[i], widths[i + 1], 2, stride=2) for i in range(depth - 1))
        self.fuse = nn.ModuleList(
            nn.Sequential(conv(w, w, 3, padding=1, bias=False), bn(w), nn.ReLU(inplace=True)) for w in widths[1:])
        self.head = nn.Sequential(up(widths[-1], widths[-1], stem_stride, stride=stem_stride),
                                  nn.ReLU(inplace=True), conv(widths[-1], out_channels, 1))

    @property
    def feature_channels(self) -> int:
        """Channels of :meth:`features` (the last fused level)."""
        return self.fuse[-1][0].out_channels if len(self.fuse) else self.proj[0].out_channels

    def features(self, dense_features: list[torch.Tensor]) -> torch.Tensor:
        """The last fused level [B, feature_channels, *S / stem_stride], before the head."""
        feats = dense_features[::-1]
        x = self.proj[0](feats[0])
        for i in range(len(self.up)):
            x = self.fuse[i](self.up[i](x) + self.proj[i + 1](feats[i + 1]))
        return x

    def forward(self, dense_features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(dense_features))


class MIMOutput(NamedTuple):
    loss: torch.Tensor  # 0-D, mean normalized-pixel MSE over masked patches
    per_patch: torch.Tensor  # [B, N] per-patch loss (AnatoMask / AMLP guidance)
    pred: torch.Tensor  # [B, C, *S] reconstruction (normalized-pixel space when norm_pix)
    embedding: torch.Tensor  # [B, C_last] mean of the deepest features over active sites
    patch_features: torch.Tensor  # [B, C_last, N] deepest features per patch (zero at masked patches)


class SparKMIM(nn.Module):
    """SparK pretraining model around a sparse encoder from :mod:`tcm_mim.models.encoders`."""

    def __init__(self, encoder: nn.Module, *, dim: int = 2, in_channels: int = 1, decoder_width: int = 256,
                 norm_pix: bool = True):
        super().__init__()
        self.encoder, self.dim, self.norm_pix = encoder, dim, norm_pix
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in encoder.channels)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02)
        self.decoder = LightDecoder(dim, list(encoder.channels), decoder_width, in_channels, encoder.stem_stride)
        self.backend: str | None = None

    @property
    def patch_size(self) -> int:
        return self.encoder.downsample_ratio

    def grid_shape(self, image: torch.Tensor) -> tuple[int, ...]:
        p = self.patch_size
        if any(s % p for s in image.shape[2:]):
            raise ValueError(f"SparKMIM: image spatial shape {tuple(image.shape[2:])} must be a multiple of the "
                             f"patch size {p}")
        return tuple(s // p for s in image.shape[2:])

    def forward(self, image: torch.Tensor, visible: torch.Tensor) -> MIMOutput:
        """image [B, C, *S]; visible bool [B, N] on the patch grid (True = kept)."""
        grid = self.grid_shape(image)
        b = image.shape[0]
        vis_grid = visible.reshape(b, 1, *grid)
        pixel_mask = tcm_kernels.upsample_mask(vis_grid, self.patch_size)
        feats = self.encoder(masked(image, pixel_mask), pixel_mask)
        dense = [tcm_kernels.densify(f, m, tok) for (f, m), tok in zip(feats, self.mask_tokens)]
        pred = self.decoder(dense)
        loss, per_patch = tcm_kernels.masked_recon_loss(pred, image, visible, self.patch_size,
                                                        norm_pix=self.norm_pix, backend=self.backend)
        last, last_mask = feats[-1]
        w = last_mask.to(last.dtype)
        embedding = (last * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1.0)
        # The deepest stage has the stride of a patch: one feature vector per patch, in patch order.
        return MIMOutput(loss, per_patch, pred, embedding, last.flatten(2))
