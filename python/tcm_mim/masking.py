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


def region_ratio_mask(roi: torch.Tensor, roi_ratio: float, background_ratio: float, *, seed: int,
                      offset: int) -> torch.Tensor:
    """TCM's masking as its authors' code does it: fixed shares of each region, uniformly within it.

    round(roi_ratio * n_roi) of each image's ROI patches and round(background_ratio * n_bg) of its
    background patches are masked, so the overall share varies with each image's ROI size (unlike
    ``sample_mask``, which masks the same count in every row).

    Args:
        roi: bool [B, N], True for ROI patches.
        roi_ratio, background_ratio: in [0, 1].
        seed, offset: the draw; equal pairs give equal masks on every device.

    Returns:
        visible bool [B, N] on ``roi``'s device (True = kept).
    """
    if roi.dtype != torch.bool or roi.dim() != 2:
        raise ValueError(f"region_ratio_mask: roi must be bool [B, N], got {roi.dtype} {tuple(roi.shape)}")
    for name, r in (("roi_ratio", roi_ratio), ("background_ratio", background_ratio)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"region_ratio_mask: {name} must be in [0, 1], got {r}")
    b, n = roi.shape
    # A host generator keyed by (seed, offset): the same keys on every device.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + offset) % 2**63)
    keys = torch.rand(b, n, generator=gen).to(roi.device)
    # Sorting by (region, key) lists each image's ROI patches in random order, then its background ones.
    order = torch.argsort(keys + 2.0 * (~roi), dim=1)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=roi.device).expand(b, n))
    n_roi = roi.sum(1, keepdim=True)
    k_roi = torch.floor(roi_ratio * n_roi + 0.5)
    k_bg = torch.floor(background_ratio * (n - n_roi) + 0.5)
    masked = torch.where(roi, position < k_roi, position - n_roi < k_bg)
    return ~masked


def realised_ratios(visible: torch.Tensor, roi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shares of patches masked over the batch: overall, of the ROI patches and of the background ones.

    Args:
        visible, roi: bool [B, N].

    Returns:
        {"masked", "roi_masked", "bg_masked"}: 0-D float32 (0 for a region with no patch).
    """
    masked = (~visible).float()
    roi_f = roi.float()
    bg_f = 1 - roi_f
    return {"masked": masked.mean(),
            "roi_masked": (masked * roi_f).sum() / roi_f.sum().clamp_min(1),
            "bg_masked": (masked * bg_f).sum() / bg_f.sum().clamp_min(1)}
