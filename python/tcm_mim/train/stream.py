"""Deterministic streams of training crops (and their saliency): 2-D slices or 3-D cubes.

Item ``i`` is a pure function of ``(seed, i)``: which scan, slice or crop position, prompt
and augmentation. A run that resumes at step ``s`` therefore sees exactly the batches
the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import Augment, Scan, normalize_intensity, random_crop

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + index * 0xBF58476D1CE4E5B9) % 2**63)


def _training_range(length: int, slice_range: tuple[float, float]) -> tuple[int, int]:
    """[lo, hi) indices of the first (superior-inferior) axis the stream may draw from."""
    lo, hi = int(slice_range[0] * length), max(int(slice_range[1] * length), 1)
    return lo, max(hi, lo + 1)


class _CropStream:
    """What both streams share: normalised images, saliency provider, augmentation, batching."""

    def __init__(self, scans: Sequence[Scan], size: int, *, saliency, prompts: Sequence[str],
                 flip_axes: tuple[int, ...], rotate_deg: float, scale: float, intensity: float, seed: int):
        if not scans:
            raise ValueError(f"{type(self).__name__}: scans must not be empty")
        self.size, self.seed, self.prompts = size, seed, list(prompts)
        self.geometry = Augment(flip_axes=flip_axes, rotate_deg=rotate_deg, scale=scale, intensity_scale=0.0,
                                intensity_shift=0.0, gamma=0.0)
        self.intensity = Augment(rotate_deg=0.0, scale=0.0, intensity_scale=intensity,
                                 intensity_shift=intensity / 2, gamma=2 * intensity)
        self.images = [torch.from_numpy(normalize_intensity(s.image, s.modality)) for s in scans]
        self.saliency = saliency

    def _prompt_saliency(self, scan: int, gen: torch.Generator) -> torch.Tensor | None:
        if self.saliency is None or not self.prompts:
            return None
        prompt = self.prompts[int(torch.randint(len(self.prompts), (), generator=gen))]
        return self.saliency(scan, prompt)

    def _augment(self, image: torch.Tensor, sal: torch.Tensor, gen: torch.Generator, spatial: int):
        """One crop and one geometry for image and saliency [*S], then the image's intensity."""
        # Crop first (random_crop takes the saliency as its "labels": same box), so only crops are copied.
        image, sal = random_crop(image[None], sal, (self.size,) * spatial, gen)
        stacked = torch.stack([image[0], sal.to(image.dtype)])
        stacked, _ = self.geometry(stacked, None, gen)
        image, _ = self.intensity(stacked[:1], None, gen)
        return image.contiguous(), stacked[1:].clamp(0, 1).contiguous()

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``[step * batch_size, (step + 1) * batch_size)`` stacked: [B, 1, *crop] each."""
        items = [self.item(step * batch_size + j) for j in range(batch_size)]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


class SliceStream(_CropStream):
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
        # Flips are left out: a flipped left lung is a right lung to the prompt.
        super().__init__(scans, size, saliency=saliency, prompts=prompts, flip_axes=(),
                         rotate_deg=rotate_deg, scale=scale, intensity=intensity, seed=seed)
        self.slices = [list(range(*_training_range(img.shape[0], slice_range))) if img.dim() == 3 else [None]
                       for img in self.images]

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [1, size, size] in [0, 1], saliency float [1, size, size] in [0, 1])."""
        gen = _generator(self.seed, index)
        s = int(torch.randint(len(self.images), (), generator=gen))
        k = self.slices[s][int(torch.randint(len(self.slices[s]), (), generator=gen))]
        image = self.images[s] if k is None else self.images[s][k]
        sal = self._prompt_saliency(s, gen)
        sal = torch.zeros_like(image) if sal is None else (sal if k is None else sal[k])
        return self._augment(image, sal, gen, spatial=2)


class VolumeStream(_CropStream):
    """Random cubic 3-D crops from a list of volumes.

    Each crop lies in the ``slice_range`` slab of the volume's first (superior-inferior) axis,
    the slab the 2-D stream draws its slices from, so the evaluation's held-out slices stay
    unseen in 3-D too (a slab thinner than the crop is zero-padded). Augmentation is what
    stays cheap on a volume: flips of the superior-inferior and anterior-posterior axes
    (never left-right: prompts name sides), a small rotation in the axial plane with a zoom
    (one trilinear resample of image and saliency together), intensity scale/shift/gamma.

    Args:
        scans: :class:`tcm_mim.data.Scan` list of 3-D volumes [D, H, W] ([S, P, L]).
        size: side of the cubic crops.
        slice_range, saliency, prompts, intensity, seed: as :class:`SliceStream`.
        flip_axes: volume axes that may be flipped (each with probability 1/2).
        rotate_deg, scale: axial-plane rotation and zoom; 0 and 0 skip the resample.
    """

    def __init__(self, scans: Sequence[Scan], size: int, *, slice_range: tuple[float, float] = (0.0, 0.8),
                 saliency=None, prompts: Sequence[str] = (), flip_axes: tuple[int, ...] = (0, 1),
                 rotate_deg: float = 8.0, scale: float = 0.1, intensity: float = 0.1, seed: int = 0):
        flat = [s.name for s in scans if s.image.ndim != 3]
        if flat:
            raise ValueError(f"VolumeStream: every scan must be a 3-D volume, got 2-D images {flat}")
        if 2 in flip_axes:
            raise ValueError("VolumeStream: flip_axes must not contain 2 (left-right): prompts name sides")
        super().__init__(scans, size, saliency=saliency, prompts=prompts, flip_axes=flip_axes,
                         rotate_deg=rotate_deg, scale=scale, intensity=intensity, seed=seed)
        self.slabs = [_training_range(img.shape[0], slice_range) for img in self.images]

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [1, size, size, size] in [0, 1], saliency float [1, size, size, size] in [0, 1])."""
        gen = _generator(self.seed, index)
        s = int(torch.randint(len(self.images), (), generator=gen))
        lo, hi = self.slabs[s]
        image = self.images[s][lo:hi]
        sal = self._prompt_saliency(s, gen)
        sal = torch.zeros_like(image) if sal is None else sal[lo:hi]
        return self._augment(image, sal, gen, spatial=3)
