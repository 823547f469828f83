"""Segmentation network for fine-tuning: the dense export of a (pretrained) sparse encoder and
SparK's light U-Net decoder with a class head."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_encoder, export_dense
from ..models.spark import LightDecoder
from ..errors import UserError
from ..train import checkpoint
from ..train.config import config_from_dict


class SegmentationNet(nn.Module):
    """forward(images [B, C_in, *S]) -> (logits [B, K, *S], features [B, feature_channels, *S / stem_stride]).

    ``features`` is the decoder's last fused level (stride = the encoder's stem stride), the stage
    CORN's CCM and DFP act on.
    """

    def __init__(self, sparse_encoder: nn.Module, num_classes: int, *, dim: int, decoder_width: int = 64):
        super().__init__()
        self.encoder = export_dense(sparse_encoder)
        self.decoder = LightDecoder(dim, list(sparse_encoder.channels), decoder_width, num_classes,
                                    sparse_encoder.stem_stride)
        # Logits come from the fused features by a 1^d conv and linear upsampling, not from the decoder's
        # transposed-conv image head: with that head the network learned only the background here (chest
        # organs, 150 steps, full labels: test Dice 0.00 vs 0.15 for a 1^d conv on the encoder stages).
        self.decoder.head = nn.Identity()
        self.classifier = (nn.Conv2d if dim == 2 else nn.Conv3d)(self.decoder.feature_channels, num_classes, 1)
        self.dim, self.stride = dim, sparse_encoder.downsample_ratio
        self.stem_stride = sparse_encoder.stem_stride

    @property
    def feature_channels(self) -> int:
        return self.decoder.feature_channels

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = tuple(images.shape[2:])
        if images.dim() != self.dim + 2 or any(s % self.stride for s in spatial):
            raise ValueError(f"SegmentationNet: images must be [B, C, *S] with {self.dim} spatial dims, each a "
                             f"multiple of the encoder's stride {self.stride}; got shape {tuple(images.shape)}")
        feats = self.decoder.features(self.encoder(images))
        logits = F.interpolate(self.classifier(feats), size=spatial, mode="bilinear" if self.dim == 2 else "trilinear",
                               align_corners=False)
        return logits, feats


def load_pretrained_encoder(path: str | os.PathLike, encoder: str, dim: int) -> nn.Module:
    """The sparse encoder of a ``tcm-pretrain`` checkpoint (digest verified, loaded with ``weights_only=True``
    by :func:`tcm_mim.train.checkpoint.load`).

    Raises :class:`~tcm_mim.errors.UserError` when the checkpoint's encoder name or spatial dims differ from
    ``encoder``/``dim``, :class:`~tcm_mim.train.checkpoint.CheckpointError` when its weights do not fit.
    """
    state = checkpoint.load(path, required=("model", "config"))
    cfg = config_from_dict(state["config"], source=str(path))
    if cfg.encoder != encoder or cfg.spatial_dims != dim:
        raise UserError(f"load_pretrained_encoder: {path} holds a {cfg.spatial_dims}-D {cfg.encoder!r} encoder, but "
                        f"the fine-tuning config asks for a {dim}-D {encoder!r}; set encoder={cfg.encoder} "
                        f"dim={cfg.spatial_dims}")
    model = build_encoder(encoder, dim=dim, in_channels=1)
    weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing / unexpected keys or shapes: the file does not match its config
        raise checkpoint.CheckpointError(f"checkpoint {path}: its encoder weights do not fit a {dim}-D {encoder!r}: "
                                         f"{str(err).splitlines()[0]}") from None
    return model
