"""Saliency map -> patch scores -> sampled mask, for one image of any size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tcm_kernels


@dataclass(frozen=True)
class PixelMask:
    """A sampled mask and what it was drawn from.

    Attributes:
        sample: the ``tcm_kernels.MaskSample`` of the padded patch grid (batch of one).
        scores: float [1, N] patch scores given to ``sample_mask``.
        grid_shape: the patch grid (one entry per spatial dim).
        visible: bool [*S] at pixel resolution, True where the patch is kept.
        roi: bool [N], patches with score >= roi_threshold.
    """

    sample: tcm_kernels.MaskSample
    scores: torch.Tensor
    grid_shape: tuple[int, ...]
    visible: torch.Tensor
    roi: torch.Tensor


def mask_from_saliency(saliency: torch.Tensor, patch_size: int, mask_ratio: float, *, strategy: str = "stratified",
                       seed: int = 0, roi_threshold: float = 0.5, roi_mask_ratio: float | None = 0.75,
                       reduce: str = "max", **sample_kwargs) -> PixelMask:
    """Sample a patch mask for one saliency map [*S] (2-D or 3-D).

    The map is zero-padded at the end of each axis to a multiple of ``patch_size``, pooled with
    ``tcm_kernels.patch_scores(reduce=...)`` ("max": a patch is ROI as soon as any of its pixels is,
    "mean": when on average it is) and masked with ``tcm_kernels.sample_mask``.
    """
    if saliency.dim() not in (2, 3):
        raise ValueError(f"mask_from_saliency: saliency must be [H, W] or [D, H, W], got {tuple(saliency.shape)}")
    shape = tuple(saliency.shape)
    pad = [(-s) % patch_size for s in shape]
    flat_pad = [p for amount in reversed(pad) for p in (0, amount)]
    padded = torch.nn.functional.pad(saliency.float()[None, None], flat_pad)
    scores = tcm_kernels.patch_scores(padded, patch_size, reduce=reduce)
    if strategy != "stratified":
        roi_mask_ratio = None if strategy == "uniform" else roi_mask_ratio
    sample = tcm_kernels.sample_mask(scores, mask_ratio, strategy=strategy, seed=seed, roi_threshold=roi_threshold,
                                     roi_mask_ratio=roi_mask_ratio, **sample_kwargs)
    grid_shape = tuple(s // patch_size for s in padded.shape[2:])
    grid = sample.grid(grid_shape)
    visible = tcm_kernels.upsample_mask(grid, patch_size)[0, 0]
    visible = visible[tuple(slice(0, s) for s in shape)]
    return PixelMask(sample, scores, grid_shape, visible, scores[0] >= roi_threshold)
