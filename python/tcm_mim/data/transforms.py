"""Intensity normalisation per modality and the augmentations that turn one volume into many samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Hounsfield-unit windows (level, width).
CT_WINDOWS = {"soft_tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0),
              "brain": (40.0, 80.0), "mediastinum": (50.0, 350.0)}


def normalize_intensity(image: np.ndarray, modality: str, *, window: str | tuple[float, float] = "soft_tissue",
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Map an image to float32 [0, 1].

    CT: clip to a Hounsfield window (a name in CT_WINDOWS or (level, width)). Everything else
    (MR, radiographs, photos): clip to the given percentiles of the nonzero intensities, which
    ignores the air around the body and hot outliers.
    """
    image = np.asarray(image, dtype=np.float32)
    if modality.upper() == "CT":
        level, width = CT_WINDOWS[window] if isinstance(window, str) else window
        lo, hi = level - width / 2, level + width / 2
    else:
        values = image[image != 0] if np.any(image != 0) else image.ravel()
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


@dataclass
class Augment:
    """Random flip / affine / intensity changes applied jointly to an image and its labels.

    Args:
        flip_axes: spatial axes that may be flipped (each with probability 1/2). Leave out the
            left-right axis when prompts name a side: flipping it makes "left" wrong.
        rotate_deg: maximum in-plane rotation (2-D: the plane; 3-D: about the first axis).
        scale: maximum relative zoom (0.1 = 0.9x to 1.1x).
        intensity_scale, intensity_shift: multiplicative and additive jitter of [0, 1] intensities.
        gamma: maximum |log gamma| of a random gamma curve.
    """

    flip_axes: tuple[int, ...] = ()
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    gamma: float = 0.2

    def __call__(self, image: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator):
        """image float [C, *S] in [0, 1], labels int [*S] or None -> the same, transformed."""
        spatial = image.dim() - 1

        def uniform(lo: float, hi: float) -> float:
            return float(lo + (hi - lo) * torch.rand((), generator=gen))

        for axis in self.flip_axes:
            if torch.rand((), generator=gen) < 0.5:
                image = image.flip(1 + axis)
                labels = labels.flip(axis) if labels is not None else None
        if self.rotate_deg or self.scale:
            angle = np.deg2rad(uniform(-self.rotate_deg, self.rotate_deg))
            zoom = uniform(1 - self.scale, 1 + self.scale)
            rot = torch.eye(spatial + 1, dtype=torch.float32)[:spatial]
            c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
            # affine_grid's last two theta axes are (x, y) = the last two spatial dims: rotate in that plane.
            rot[0, 0], rot[0, 1], rot[1, 0], rot[1, 1] = c, -s, s, c
            if spatial == 3:
                rot[2, 2] = 1 / zoom
            grid = torch.nn.functional.affine_grid(rot[None], [1, 1, *image.shape[1:]], align_corners=False)
            image = torch.nn.functional.grid_sample(image[None], grid, mode="bilinear", padding_mode="border",
                                                    align_corners=False)[0]
            if labels is not None:
                labels = torch.nn.functional.grid_sample(labels[None, None].float(), grid, mode="nearest",
                                                         padding_mode="zeros", align_corners=False)[0, 0].long()
        image = image * uniform(1 - self.intensity_scale, 1 + self.intensity_scale)
        image = image + uniform(-self.intensity_shift, self.intensity_shift)
        image = image.clamp(0, 1) ** float(np.exp(uniform(-self.gamma, self.gamma)))
        return image, labels


def random_crop(image: torch.Tensor, labels: torch.Tensor | None, size: tuple[int, ...], gen: torch.Generator):
    """Crop image [C, *S] (and labels [*S]) to ``size``, zero-padding axes shorter than it."""
    spatial = image.shape[1:]
    pads = [max(t - s, 0) for s, t in zip(spatial, size)]
    if any(pads):
        flat = [p for pad in reversed(pads) for p in (pad // 2, pad - pad // 2)]
        image = torch.nn.functional.pad(image, flat)
        labels = torch.nn.functional.pad(labels, flat) if labels is not None else None
        spatial = image.shape[1:]
    starts = [int(torch.randint(s - t + 1, (), generator=gen)) for s, t in zip(spatial, size)]
    box = tuple(slice(a, a + t) for a, t in zip(starts, size))
    return image[(slice(None), *box)], (labels[box] if labels is not None else None)
