"""The localizer contract and the mask -> saliency map step they share."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .._deps import require
from ..data.scan import LabelMap


@runtime_checkable
class Localizer(Protocol):
    """Turns an image and a text prompt into a saliency map.

    ``__call__(image, prompt, *, labels=None) -> saliency``: ``image`` is a numpy array or tensor
    whose trailing dims are the spatial shape S (2-D or 3-D); the result is a float32 tensor of
    shape S with values in [0, 1] (1 = the prompted region). ``labels`` is a
    :class:`~tcm_mim.data.LabelMap` for localizers that match prompts to label names.
    ``cache_key`` identifies the localizer and its settings in a :class:`SaliencyCache`.
    """

    cache_key: str

    def __call__(self, image, prompt: str, *, labels: LabelMap | None = None) -> torch.Tensor: ...


def mask_to_saliency(mask: np.ndarray, spacing: tuple[float, ...] | None = None, *, margin_mm: float = 0.0,
                     softness_mm: float | None = None) -> torch.Tensor:
    """Soft saliency from a binary mask: a sigmoid of the signed distance to the mask surface.

    saliency = sigmoid((margin_mm - signed_distance) / softness_mm), with the signed distance in mm
    measured from the half-voxel surface (negative inside). The 0.5 level set is the mask grown by
    ``margin_mm``; ``softness_mm`` (default: a quarter of the finest spacing) sets how fast the
    saliency falls off on either side, so thresholding at 0.5 gives back the (grown) mask.

    Args:
        mask: bool [*S] (2-D or 3-D).
        spacing: mm per pixel/voxel (default 1 mm).

    Returns:
        float32 tensor [*S] in [0, 1].
    """
    ndimage = require("scipy.ndimage", package="scipy", purpose="mask_to_saliency")
    mask = np.asarray(mask, dtype=bool)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * mask.ndim
    if len(spacing) != mask.ndim:
        raise ValueError(f"mask_to_saliency: spacing must have {mask.ndim} entries, got {spacing}")
    if softness_mm is None:
        softness_mm = 0.25 * min(spacing)
    if softness_mm <= 0:
        raise ValueError(f"mask_to_saliency: softness_mm must be > 0, got {softness_mm}")
    saliency = torch.zeros(mask.shape, dtype=torch.float32)
    if not mask.any():
        return saliency
    # Distances are only needed where the sigmoid is not ~0 (< 5e-5 beyond 10 softness widths):
    # a padded bounding box of the mask, whose border is background, so both transforms are exact.
    pad = [int(np.ceil((max(margin_mm, 0.0) + 10 * softness_mm) / s)) + 1 for s in spacing]
    nonzero = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - p, 0), min(int(i.max()) + p + 1, n))
                for i, p, n in zip(nonzero, pad, mask.shape))
    sub = np.pad(mask[box], 1)  # keep a background border even where the box meets the image edge
    half = 0.5 * min(spacing)
    outside = ndimage.distance_transform_edt(~sub, sampling=spacing)
    inside = ndimage.distance_transform_edt(sub, sampling=spacing)
    signed = np.where(sub, -(inside - half), outside - half)[(slice(1, -1),) * mask.ndim]
    saliency[box] = torch.sigmoid(torch.from_numpy((margin_mm - signed) / softness_mm).float())
    return saliency


def spatial_shape(image, ndim: int) -> tuple[int, ...]:
    """The trailing ``ndim`` dims of an image's shape."""
    shape = tuple(image.shape)
    if len(shape) < ndim:
        raise ValueError(f"image must have at least {ndim} dims, got shape {shape}")
    return shape[-ndim:]
