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

from .layers import make_norm, masked

# Parameters SparK exempts from weight decay (besides every 1-D parameter: norms' affine and biases).
_NO_DECAY_NAMES = ("mask_tokens",)


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Optimiser groups as SparK builds them: weight decay on weights, none on mask tokens, norms and biases
    (every parameter of ndim <= 1 or named in ``_NO_DECAY_NAMES``).

    Args:
        named_params: iterable of (name, parameter), e.g. ``model.named_parameters()``; frozen ones are skipped.
        weight_decay: the decay of the first group.

    Returns:
        [{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}].
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            exempt = p.ndim <= 1 or any(k in name.split(".") for k in _NO_DECAY_NAMES)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sync_decoder_norms(model: nn.Module, device: torch.device) -> bool:
    """Under DDP: the dense decoder's batch norms become ``nn.SyncBatchNorm`` (SparK's ``sbn``), so their
    statistics cover every rank's batch as the sparse norms' do (``sync=True``).

    torch's SyncBatchNorm runs on GPUs only (CUDA, XPU, a PrivateUse1 device); on a CPU process group (tests)
    the decoder's norms stay per rank. Returns whether they were converted.
    """
    if device.type == "cpu":
        return False
    model.decoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.decoder)
    return True


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


def _up(dim: int):
    return nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d


def _projections(dim: int, channels: list[int], widths: list[int]) -> nn.ModuleList:
    """SparK's densify projections, deepest scale first: 1^d conv at the deepest scale, 3^d elsewhere (bias)."""
    return nn.ModuleList(_conv(dim)(c, w, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
                         for i, (c, w) in enumerate(zip(reversed(channels), widths)))


class LightDecoder(nn.Module):
    """This package's small U-Net decoder: from the deepest stage up, x2 transposed conv (k2), add the
    densified skip (projected to the width), one 3^d conv + BN + ReLU; a final transposed conv back to image
    resolution and a 1^d conv to the image channels. Width ``width`` at the deepest scale, halved per scale
    (at least 8)."""

    def __init__(self, dim: int, channels: list[int], width: int, out_channels: int, stem_stride: int):
        super().__init__()
        conv, bn, up = _conv(dim), _bn(dim), _up(dim)
        depth = len(channels)
        widths = [max(width // 2 ** i, 8) for i in range(depth)]  # deepest level first
        self.proj = _projections(dim, channels, widths)
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
        """dense_features: per stage, shallowest first, [B, C_i, *S / stride_i] -> the last fused level
        [B, feature_channels, *S / stem_stride], before the head."""
        feats = dense_features[::-1]
        x = self.proj[0](feats[0])
        for i in range(len(self.up)):
            x = self.fuse[i](self.up[i](x) + self.proj[i + 1](feats[i + 1]))
        return x

    def forward(self, dense_features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(dense_features))


class SparKDecoder(nn.Module):
    """SparK's light decoder (keyu-tian/SparK ``pretrain/decoder.py``): log2(patch) U-Net blocks from the
    deepest scale up, each a transposed conv k4/s2/p1 (bias), then conv3-BN-ReLU6-conv3-BN (no bias); block i
    maps width / 2^i to width / 2^(i+1) channels and first adds the densified (projected) features of scale i;
    a 1^d conv to the image channels. SparK's width is 768. An encoder with a full-resolution stage (nnU-Net's
    residual encoders: log2(patch) + 1 stages) has its stride-1 features added after the last block."""

    def __init__(self, dim: int, channels: list[int], width: int, out_channels: int, patch_size: int):
        super().__init__()
        n = patch_size.bit_length() - 1
        if patch_size != 2 ** n or n < len(channels) - 1:
            raise ValueError(f"SparKDecoder: patch_size must be a power of 2 of at least 2^(stages - 1), got "
                             f"{patch_size} for {len(channels)} stages")
        if width // 2 ** n < 1:
            raise ValueError(f"SparKDecoder: width must be at least 2^{n} = {2 ** n} (it halves {n} times), "
                             f"got {width}")
        conv, bn, up = _conv(dim), _bn(dim), _up(dim)
        widths = [width // 2 ** i for i in range(n + 1)]
        self.proj = _projections(dim, channels, widths)
        self.blocks = nn.ModuleList(nn.Sequential(
            up(cin, cin, 4, stride=2, padding=1),
            conv(cin, cin, 3, padding=1, bias=False), bn(cin), nn.ReLU6(inplace=True),
            conv(cin, cout, 3, padding=1, bias=False), bn(cout)) for cin, cout in zip(widths[:-1], widths[1:]))
        self.head = conv(widths[-1], out_channels, 1)
        for m in self.modules():  # SparK's initialisation of its decoder
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, dense_features: list[torch.Tensor]) -> torch.Tensor:
        """dense_features: per stage, shallowest first, [B, C_i, *S / stride_i] -> [B, out_channels, *S]."""
        feats = dense_features[::-1]
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(feats):
                x = x + self.proj[i](feats[i])
            x = block(x)
        if len(feats) > len(self.blocks):  # a full-resolution stage: its features join at image resolution
            x = x + self.proj[-1](feats[-1])
        return self.head(x)


DECODERS = ("light", "spark")


class MIMOutput(NamedTuple):
    loss: torch.Tensor  # 0-D, mean normalized-pixel MSE over masked patches
    per_patch: torch.Tensor  # [B, N] per-patch loss (AnatoMask / AMLP guidance)
    pred: torch.Tensor  # [B, C, *S] reconstruction (normalized-pixel space when norm_pix)
    embedding: torch.Tensor  # [B, C_last] mean of the deepest features over active sites
    patch_features: torch.Tensor  # [B, C_last, N] deepest features per patch (zero at masked patches)


class SparKMIM(nn.Module):
    """SparK pretraining model around a sparse encoder from :mod:`tcm_mim.models.encoders`.

    Per scale, as SparK: a sparse norm of the encoder's kind over the active sites (``densify_norms``),
    then the mask token at the masked sites, then the decoder's projection. ``decoder``: ``"light"``
    (:class:`LightDecoder`, this package's) or ``"spark"`` (:class:`SparKDecoder`, SparK's; width 768 there).
    """

    def __init__(self, encoder: nn.Module, *, dim: int = 2, in_channels: int = 1, decoder_width: int = 256,
                 decoder: str = "light", norm_pix: bool = True):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"SparKMIM: decoder must be one of {DECODERS}, got {decoder!r}")
        self.encoder, self.dim, self.norm_pix = encoder, dim, norm_pix
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in encoder.channels)
        for t in self.mask_tokens:
            nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)  # SparK truncates at one standard deviation
        self.densify_norms = nn.ModuleList(make_norm(encoder.norm, c, dim) for c in encoder.channels)
        channels = list(encoder.channels)
        self.decoder = LightDecoder(dim, channels, decoder_width, in_channels, encoder.stem_stride) \
            if decoder == "light" else SparKDecoder(dim, channels, decoder_width, in_channels, encoder.downsample_ratio)
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
        dense = [tcm_kernels.densify(norm(f, m), m, tok) for (f, m), norm, tok in
                 zip(feats, self.densify_norms, self.mask_tokens)]
        pred = self.decoder(dense)
        loss, per_patch = tcm_kernels.masked_recon_loss(pred, image, visible, self.patch_size,
                                                        norm_pix=self.norm_pix, backend=self.backend)
        last, last_mask = feats[-1]
        w = last_mask.to(last.dtype)
        embedding = (last * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1.0)
        # The deepest stage has the stride of a patch: one feature vector per patch, in patch order.
        return MIMOutput(loss, per_patch, pred, embedding, last.flatten(2))
