"""Plain-PyTorch reference of masked_recon_loss: MAE/SparK's patchify, normalize, MSE."""

from __future__ import annotations

import math

import torch

from .._core.dtypes import accumulation_dtype
from .._core.geometry import blocked_shape


def patchify(img: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """[B, C, *S] -> [B, N, C * prod(patch_size)] with patches in row-major grid order.

    Within a patch, elements are ordered (c, *offsets); the order does not matter to
    the loss, which only takes patch means.
    """
    b, c = img.shape[:2]
    spatial = img.shape[2:]
    grid = [s // p for s, p in zip(spatial, patch_size)]
    x = img.reshape(b, c, *blocked_shape(spatial, patch_size))
    d = len(spatial)
    perm = [0] + [2 + 2 * i for i in range(d)] + [1] + [3 + 2 * i for i in range(d)]
    return x.permute(perm).reshape(b, math.prod(grid), c * math.prod(patch_size))


def masked_recon_loss(pred, target, visible, patch_size, norm_pix=True, eps=1e-6):
    """(loss, per_patch): per-patch MSE against the (normalized) target, mean over masked patches."""
    opmath = accumulation_dtype(pred.dtype)
    p = patchify(pred.to(opmath), patch_size)
    t = patchify(target.detach().to(opmath), patch_size)  # the target is data: no gradient
    if norm_pix:
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, keepdim=True, unbiased=True)
        t = (t - mean) / (var + eps) ** 0.5
    per_patch = ((p - t) ** 2).mean(-1)
    masked = (~visible).to(per_patch.dtype)
    loss = (per_patch * masked).sum() / masked.sum().clamp_min(1)
    return loss, per_patch
