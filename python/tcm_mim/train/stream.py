"""Deterministic streams of training crops (and their saliency): 2-D slices or 3-D cubes.

Item ``i`` is a pure function of ``(seed, i)``: which scan, slice or crop position, prompt
and augmentation. A run that resumes at step ``s`` therefore sees exactly the batches
the uninterrupted run would have seen, with no sampler state to save, and a DataLoader
with any number of workers returns the same items (``tcm_mim.train.loader``).

The scans are either in memory (a list of :class:`~tcm_mim.data.Scan`) or a
:class:`~tcm_mim.data.PreparedCorpus`, read through memory maps: the crop's box is chosen
first (the same draws as :func:`~tcm_mim.data.random_crop`), then only that box is read,
so both give the same crops of the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data import Augment, PreparedCorpus, Scan, crop_starts, normalize_intensity, read_crop
from ..data.split import SplitManifest

_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + index * 0xBF58476D1CE4E5B9) % 2**63)


def _training_range(length: int, slice_range: tuple[float, float]) -> tuple[int, int]:
    """[lo, hi) indices of the first (superior-inferior) axis the stream may draw from."""
    lo, hi = int(slice_range[0] * length), max(int(slice_range[1] * length), 1)
    return lo, max(hi, lo + 1)


def _allowed(stream: _CropStream, slice_range: tuple[float, float]) -> list[list[tuple[int, int]]]:
    """Per scan, the [lo, hi) ranges of its first axis the stream may read: ``slice_range``, or with a
    split manifest the slices outside its held-out blocks and guard bands ([] for a held-out scan)."""
    out = []
    for key, shape in zip(stream.keys, stream.source.shapes):
        depth = shape[0] if len(shape) == 3 else 1
        if stream.split is None:
            out.append([_training_range(depth, slice_range)])
        else:
            out.append(stream.split.pretrain_ranges(key, depth))
    if not any(out):
        raise ValueError(f"{type(stream).__name__}: the split manifest holds out every scan and slice; nothing is "
                         f"left to pretrain on")
    return out


class _Memory:
    """In-memory scans: normalised float32 images and a saliency callable (scan, prompt) -> float [*S]."""

    def __init__(self, scans: Sequence[Scan], saliency):
        self.images = [torch.from_numpy(normalize_intensity(s.image, s.modality)) for s in scans]
        self.saliency = saliency
        self.shapes = [tuple(img.shape) for img in self.images]

    def crop(self, s: int, view: tuple, starts: list[int], size: tuple[int, ...]) -> np.ndarray:
        return read_crop(self.images[s].numpy(), starts, size, view=view)

    def saliency_crop(self, s: int, prompt: str, view: tuple, starts: list[int], size: tuple[int, ...]):
        sal = self.saliency(s, prompt)
        sal = sal.numpy() if isinstance(sal, torch.Tensor) else np.asarray(sal)
        return read_crop(sal, starts, size, view=view).astype(np.float32)


class _Corpus:
    """A prepared corpus: crops and stored saliency read through memory maps (see PreparedCorpus)."""

    def __init__(self, corpus: PreparedCorpus, localizer_key: str | None):
        self.corpus, self.localizer_key = corpus, localizer_key
        self.saliency = localizer_key
        self.shapes = [corpus.shape(i) for i in range(len(corpus))]

    def crop(self, s: int, view: tuple, starts: list[int], size: tuple[int, ...]) -> np.ndarray:
        return self.corpus.crop(s, starts, size, view=view)

    def saliency_crop(self, s: int, prompt: str, view: tuple, starts: list[int], size: tuple[int, ...]):
        return self.corpus.saliency_crop(s, prompt, self.localizer_key, starts, size, view=view)


class _CropStream:
    """What both streams share: normalised images, saliency provider, augmentation, batching."""

    def __init__(self, scans: Sequence[Scan] | PreparedCorpus, size: int, *, saliency, prompts: Sequence[str],
                 flip_axes: tuple[int, ...], rotate_deg: float, scale: float, intensity: float, seed: int,
                 split: SplitManifest | None):
        if len(scans) == 0:
            raise ValueError(f"{type(self).__name__}: scans must not be empty")
        self.size, self.seed, self.prompts, self.split = size, seed, list(prompts), split
        # the keys a split manifest names scans by: a corpus row's source, a Scan's name
        self.keys = [row["source"] for row in scans.rows] if isinstance(scans, PreparedCorpus) \
            else [s.name for s in scans]
        self.geometry = Augment(flip_axes=flip_axes, rotate_deg=rotate_deg, scale=scale, intensity_scale=0.0,
                                intensity_shift=0.0, gamma=0.0)
        self.intensity = Augment(rotate_deg=0.0, scale=0.0, intensity_scale=intensity,
                                 intensity_shift=intensity / 2, gamma=2 * intensity)
        if isinstance(scans, PreparedCorpus):
            if saliency is not None and not isinstance(saliency, str):
                raise ValueError(f"{type(self).__name__}: with a PreparedCorpus, saliency is the cache_key of the "
                                 f"localizer whose stored saliency to read, got {type(saliency).__name__}")
            self.source = _Corpus(scans, saliency)
        else:
            self.source = _Memory(scans, saliency)
            self.images = self.source.images

    def _crop(self, s: int, view: tuple, shape: tuple[int, ...], gen: torch.Generator):
        """(image, saliency) float [*crop] of ``scan[view]`` (shape ``shape``), one random box for both."""
        prompt = None
        if self.source.saliency is not None and self.prompts:
            prompt = self.prompts[int(torch.randint(len(self.prompts), (), generator=gen))]
        size = (self.size,) * len(shape)
        starts = crop_starts(shape, size, gen)
        if self.split is not None:  # the manifest's rule, checked on every read whatever the sampling
            first = view[0] if view else None
            lo, hi = (first, first + 1) if isinstance(first, int) else \
                (first.start + max(starts[0], 0), first.start + min(starts[0] + size[0], shape[0])) \
                if isinstance(first, slice) else (0, 1)
            self.split.check_read(self.keys[s], lo, hi)
        image = torch.from_numpy(self.source.crop(s, view, starts, size))
        sal = None if prompt is None else self.source.saliency_crop(s, prompt, view, starts, size)
        # No stored saliency for this prompt (tcm-prepare warned that it matched no label): no ROI.
        sal = torch.zeros_like(image) if sal is None else torch.from_numpy(sal)
        return image, sal

    def _augment(self, image: torch.Tensor, sal: torch.Tensor, gen: torch.Generator):
        """One geometry for the image and saliency crops [*crop], then the image's intensity."""
        stacked = torch.stack([image, sal.to(image.dtype)])
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
        scans: :class:`tcm_mim.data.Scan` list (2-D images or 3-D volumes, normalised here), or a
            :class:`tcm_mim.data.PreparedCorpus` (read crop by crop through memory maps).
        size: side of the square crops.
        slice_range: (lo, hi) fractions of each volume's first axis to draw slices from (without ``split``).
        split: the split manifest (:mod:`tcm_mim.data.split`): held-out scans are never drawn, held-out
            blocks and their guard bands never read (a read that would touch them raises LeakError).
        saliency: Scan list: optional callable (scan index, prompt) -> float [*S] map of that scan;
            PreparedCorpus: the ``cache_key`` of the localizer whose stored saliency to read (or None).
        prompts: prompts to draw from, one per item (used with ``saliency``).
        rotate_deg, scale: random geometry, applied to image and saliency alike.
        intensity: random intensity scale/shift/gamma of the image (not the saliency).
    """

    def __init__(self, scans: Sequence[Scan] | PreparedCorpus, size: int, *, slice_range: tuple[float, float] = (0.0, 0.8),
                 saliency=None, prompts: Sequence[str] = (), rotate_deg: float = 8.0, scale: float = 0.1,
                 intensity: float = 0.1, seed: int = 0, split: SplitManifest | None = None):
        # Flips are left out: a flipped left lung is a right lung to the prompt.
        super().__init__(scans, size, saliency=saliency, prompts=prompts, flip_axes=(),
                         rotate_deg=rotate_deg, scale=scale, intensity=intensity, seed=seed, split=split)
        allowed = _allowed(self, slice_range)
        self.scan_ids = [s for s, ranges in enumerate(allowed) if ranges]
        self.slices = [[k for lo, hi in allowed[s] for k in range(lo, hi)] if len(self.source.shapes[s]) == 3
                       else [None] for s in self.scan_ids]

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [1, size, size] in [0, 1], saliency float [1, size, size] in [0, 1])."""
        gen = _generator(self.seed, index)
        j = int(torch.randint(len(self.slices), (), generator=gen))
        s = self.scan_ids[j]
        k = self.slices[j][int(torch.randint(len(self.slices[j]), (), generator=gen))]
        shape = self.source.shapes[s]
        image, sal = self._crop(s, () if k is None else (k,), shape if k is None else shape[1:], gen)
        return self._augment(image, sal, gen)


class VolumeStream(_CropStream):
    """Random cubic 3-D crops from a list of volumes.

    Each crop lies in one allowed slab of the volume's first (superior-inferior) axis (the
    ``slice_range`` slab, or a slab between the split's held-out blocks and guard bands), the
    slices the 2-D stream draws from, so held-out slices stay unseen in 3-D too (a slab thinner
    than the crop is zero-padded). Augmentation is what
    stays cheap on a volume: flips of the superior-inferior and anterior-posterior axes
    (never left-right: prompts name sides), a small rotation in the axial plane with a zoom
    (one trilinear resample of image and saliency together), intensity scale/shift/gamma.

    Args:
        scans: :class:`tcm_mim.data.Scan` list of 3-D volumes [D, H, W] ([S, P, L]), or a
            :class:`tcm_mim.data.PreparedCorpus` of them.
        size: side of the cubic crops.
        slice_range, saliency, prompts, intensity, seed, split: as :class:`SliceStream`.
        flip_axes: volume axes that may be flipped (each with probability 1/2).
        rotate_deg, scale: axial-plane rotation and zoom; 0 and 0 skip the resample.
    """

    def __init__(self, scans: Sequence[Scan] | PreparedCorpus, size: int, *, slice_range: tuple[float, float] = (0.0, 0.8),
                 saliency=None, prompts: Sequence[str] = (), flip_axes: tuple[int, ...] = (0, 1),
                 rotate_deg: float = 8.0, scale: float = 0.1, intensity: float = 0.1, seed: int = 0,
                 split: SplitManifest | None = None):
        if isinstance(scans, PreparedCorpus):
            flat = [row["source"] for row in scans.rows if len(row["shape"]) != 3]
        else:
            flat = [s.name for s in scans if s.image.ndim != 3]
        if flat:
            raise ValueError(f"VolumeStream: every scan must be a 3-D volume, got 2-D images {flat}")
        if 2 in flip_axes:
            raise ValueError("VolumeStream: flip_axes must not contain 2 (left-right): prompts name sides")
        super().__init__(scans, size, saliency=saliency, prompts=prompts, flip_axes=flip_axes,
                         rotate_deg=rotate_deg, scale=scale, intensity=intensity, seed=seed, split=split)
        # one (scan, slab) per allowed range: a block split leaves several slabs of one volume
        self.slabs = [(s, r) for s, ranges in enumerate(_allowed(self, slice_range)) for r in ranges]

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float [1, size, size, size] in [0, 1], saliency float [1, size, size, size] in [0, 1])."""
        gen = _generator(self.seed, index)
        s, (lo, hi) = self.slabs[int(torch.randint(len(self.slabs), (), generator=gen))]
        image, sal = self._crop(s, (slice(lo, hi),), (hi - lo, *self.source.shapes[s][1:]), gen)
        return self._augment(image, sal, gen)
