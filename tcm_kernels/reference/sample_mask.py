"""Plain-PyTorch reference of sample_mask: the recipe spelled out row by row.

Slow on purpose: every selection is a stable sort of explicit keys, so ties fall
to the lower patch index exactly as the compiled kernels' (key, index) order.
"""

from __future__ import annotations

import math

import torch

from .._core.sampling import hardest_budget
from .philox import log_portable, ordered_bits, patch_words, uniform_open


def _take_smallest(candidates: torch.Tensor, *keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates (patch indices) smallest by the lexicographic (keys..., index)."""
    order = torch.arange(candidates.numel())
    for key in reversed(keys):  # stable sorts, least significant key first
        order = order[torch.sort(key[order], stable=True).indices]
    return candidates[order[:k]]


def stratified_roi_budget(n: int, n_roi: int, num_masked: int, roi_mask_ratio: float) -> int:
    lo, hi = max(num_masked - (n - n_roi), 0), min(num_masked, n_roi)
    return min(max(math.floor(roi_mask_ratio * n_roi + 0.5), lo), hi)


def masked_patches_of_row(scores: torch.Tensor, row: int, num_masked: int, strategy: str, seed: int, offset: int,
                          temperature: float, roi_threshold: float, roi_mask_ratio: float,
                          hard_fraction: float) -> torch.Tensor:
    """Indices of the patches masked in one row (scores: float32 [N])."""
    n = scores.numel()
    patches = torch.arange(n, dtype=torch.int64)
    w0, w1, _, _ = patch_words(seed, offset, torch.tensor(row, dtype=torch.int64), patches)
    if strategy == "uniform":
        return _take_smallest(patches, w0, k=num_masked)
    if strategy == "weighted":
        inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
        positive = scores > 0
        safe = torch.where(positive, scores, 1.0)
        expo = -log_portable(uniform_open(w0))
        f = log_portable(expo) - log_portable(safe) * inv_t
        hi = torch.where(positive, ordered_bits(f), 0xFFFFFFFF)
        return _take_smallest(patches, hi, w1, k=num_masked)
    if strategy == "stratified":
        roi = scores >= torch.tensor(roi_threshold, dtype=torch.float32)
        m_roi = stratified_roi_budget(n, int(roi.sum()), num_masked, roi_mask_ratio)
        from_roi = _take_smallest(patches[roi], w0[roi], k=m_roi)
        from_bg = _take_smallest(patches[~roi], w0[~roi], k=num_masked - m_roi)
        return torch.cat([from_roi, from_bg])
    if strategy == "hardest":
        n_hard = hardest_budget(num_masked, hard_fraction)
        hard = _take_smallest(patches, (~ordered_bits(scores)) & 0xFFFFFFFF, k=n_hard)
        rest = torch.ones(n, dtype=torch.bool)
        rest[hard] = False
        return torch.cat([hard, _take_smallest(patches[rest], w0[rest], k=num_masked - n_hard)])
    raise ValueError(f"sample_mask: unknown strategy {strategy!r}")


def sample_mask(scores: torch.Tensor, num_masked: int, strategy: str, seed: int, offset: int, temperature: float,
                roi_threshold: float, roi_mask_ratio: float, hard_fraction: float):
    """Reference of torch.ops.tcm.sample_mask: (visible, ids_keep, ids_restore)."""
    scores = scores.detach().to("cpu", torch.float32)
    b, n = scores.shape
    visible = torch.ones(b, n, dtype=torch.bool)
    for row in range(b):
        masked = masked_patches_of_row(scores[row], row, num_masked, strategy, seed, offset, temperature,
                                       roi_threshold, roi_mask_ratio, hard_fraction)
        visible[row, masked] = False
    ids = torch.arange(n).expand(b, n)
    ids_keep = ids[visible].reshape(b, n - num_masked)
    ids_masked = ids[~visible].reshape(b, num_masked)
    ids_restore = torch.argsort(torch.cat([ids_keep, ids_masked], dim=1), dim=1)
    return visible, ids_keep, ids_restore
