"""A deterministic stream of 2-D training crops (and their saliency) from embedded or user scans.

Item ``i`` is a pure function of ``(seed, i)``: which scan, slice, prompt, crop and
augmentation. A run that resumes at step ``s`` therefore sees exactly the batches
the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Augment, Scan, normalize_intensity, random_crop

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + index * 0xBF58476D1CE4E5B9) % 2**63)


class SliceStream:
    """Random 2-D crops from a list of scans (3-D volumes give axial slices).

    Args:
        scans: :class:`tcm_mim.data.Scan` list (2-D images or 3-D volumes).
        size: side of the square crops.
        slice_range: (lo, hi) fractions of each volume's first axis to draw slices from;
            the evaluation uses the complementary range, so test anatomy stays unseen.
        saliency: optional callable (scan index, prompt) -> float [*S] map of that scan.
        prompts: prompts to draw from, one per item (used with ``saliency``).
        rotate_deg, scale: random geometry, applied to image and saliency alike.
        intensity: random intensity scale/shift/gamma of the image (not the saliency).
    """

    def __init__(self, scans: Sequence[Scan], size: int, *, slice_range: tuple[float, float] = (0.0, 0.8),
                 saliency=None, prompts: Sequence[str] = (), rotate_deg: float = 8.0, scale: float = 0.1,
                 intensity: float = 0.1, seed: int = 0):
        if not scans:
            raise ValueError("SliceStream: scans must not be empty")
        self.size, self.seed, self.prompts = size, seed, list(prompts)
        # Flips are left out: a flipped left lung is a right lung to the prompt.
        self.geometry = Augment(rotate_deg=rotate_deg, scale=scale, intensity_scale=0.0, intensity_shift=0.0,
                                gamma=0.0)
        self.intensity = Augment(rotate_deg=0.0, scale=0.0, intensity_scale=intensity,
                                 intensity_shift=intensity / 2, gamma=2 * intensity)
        self.images = [torch.from_numpy(normalize_intensity(s.image, s.modality)) for s in scans]
        self.saliency = saliency
        self.slices = []
        for img in self.images:
            if img.dim() == 3:
                lo, hi = int(slice_range[0] * img.shape[0]), max(int(slice_range[1] * img.shape[0]), 1)
                self.slices.append(list(range(lo, max(hi, lo + 1))))
            else:
                self.slices.append([None])

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [1, size, size] in [0, 1], saliency float [1, size, size] in [0, 1])."""
        gen = _generator(self.seed, index)
        s = int(torch.randint(len(self.images), (), generator=gen))
        k = self.slices[s][int(torch.randint(len(self.slices[s]), (), generator=gen))]
        image = self.images[s] if k is None else self.images[s][k]
        if self.saliency is not None and self.prompts:
            prompt = self.prompts[int(torch.randint(len(self.prompts), (), generator=gen))]
            sal = self.saliency(s, prompt)
            sal = sal if k is None else sal[k]
        else:
            sal = torch.zeros_like(image)
        stacked = torch.stack([image, sal.to(image.dtype)])  # one crop and one geometry for both
        stacked, _ = random_crop(stacked, None, (self.size, self.size), gen)
        stacked, _ = self.geometry(stacked, None, gen)
        image, _ = self.intensity(stacked[:1], None, gen)
        return image.contiguous(), stacked[1:].clamp(0, 1).contiguous()

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``[step * batch_size, (step + 1) * batch_size)`` stacked: [B, 1, S, S] each."""
        items = [self.item(step * batch_size + j) for j in range(batch_size)]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

