"""Labelled downstream tasks built from the embedded volumes, split by slice range.

The test slices are one contiguous axial block (the middle quarter of the labelled
slices) with a guard band of ``GUARD`` slices on each side left out of training, so
no test anatomy, nor its immediate neighbour, is seen by the probe or fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import load_embedded, normalize_intensity

GUARD = 3
ORGANS = ("lung", "heart", "liver", "aorta", "vertebra")
LOBES = {
    "frontal": ("Frontal", "Precentral", "Rectus", "OFC", "Olfactory", "Supp_Motor"),
    "temporal": ("Temporal", "Hippocampus", "ParaHippocampal", "Amygdala", "Fusiform", "Heschl"),
    "parietal": ("Parietal", "Postcentral", "SupraMarginal", "Angular", "Precuneus"),
    "occipital": ("Occipital", "Calcarine", "Cuneus", "Lingual"),
    "cerebellum": ("Cerebellum", "Vermis"),
}


@dataclass
class Task:
    """images float [M, 1, S, S] in [0, 1]; targets long [M, S, S] (segmentation) or [M] (classification)."""

    name: str
    kind: str  # "segmentation" | "classification"
    classes: tuple[str, ...]  # index 0 is background for segmentation
    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor


def _split(labelled: np.ndarray) -> tuple[list[int], list[int]]:
    """(train, test) slice indices: test = the middle quarter of the labelled slices."""
    idx = np.nonzero(labelled)[0]
    lo, hi = idx[int(0.375 * len(idx))], idx[int(0.625 * len(idx))]
    test = [int(k) for k in idx if lo <= k < hi]
    train = [int(k) for k in idx if k < lo - GUARD or k >= hi + GUARD]
    return train, test


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (or centre-crop) the last two axes to ``size``."""
    starts = [max(s - size, 0) // 2 for s in x.shape[-2:]]
    x = x[..., starts[0]:starts[0] + size, starts[1]:starts[1] + size]
    pads = [((size - s) // 2, size - s - (size - s) // 2) for s in x.shape[-2:]]
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + pads)


def _class_map(names: dict[int, str], groups: dict[str, tuple[str, ...]]) -> tuple[np.ndarray, tuple[str, ...]]:
    classes = tuple(g for g in groups if any(any(k.lower() in n.lower() for k in groups[g]) for n in names.values()))
    lut = np.zeros(max(names) + 1, dtype=np.int64)
    for label_id, name in names.items():
        for c, group in enumerate(classes, start=1):
            if any(k.lower() in name.lower() for k in groups[group]):
                lut[label_id] = c
                break
    return lut, classes


def chest_organ_volume(size: int = 160) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[int], list[int]]:
    """The chest CT as (image float32 [D, size, size] in [0, 1], organ classes int64 [D, size, size],
    class names with background first, train slice indices, test slice indices (held-out axial block))."""
    scan = load_embedded("chest_ct")[0]
    lut, classes = _class_map(scan.label_names, {o: (o,) for o in ORGANS})
    volume = _pad_to(normalize_intensity(scan.image, "CT"), size)
    target = _pad_to(lut[scan.label_map.astype(np.int64)], size)
    train, test = _split(target.reshape(target.shape[0], -1).max(1) > 0)
    return volume, target, ("background", *classes), train, test


def chest_organ_task(size: int = 160) -> Task:
    """Axial chest-CT slices (2.5 mm, padded to ``size``) with organ classes (background + ORGANS present)."""
    volume, target, classes, train, test = chest_organ_volume(size)

    def take(ks):
        return torch.from_numpy(volume[ks])[:, None].float(), torch.from_numpy(target[ks]).long()

    return Task("chest_ct organ segmentation", "segmentation", classes, *take(train), *take(test))


def brain_lobe_task(crop: int = 32, per_slice: int = 24, seed: int = 0) -> Task:
    """Crops of axial brain-MRI slices classified by the lobe of their centre voxel (AAL3 groups)."""
    scan = load_embedded("brain_mri")[0]
    lut, classes = _class_map(scan.label_names, LOBES)
    volume = normalize_intensity(scan.image, "MR")
    lobes = lut[scan.label_map.astype(np.int64)]
    train, test = _split(lobes.reshape(lobes.shape[0], -1).max(1) > 0)
    rng = np.random.default_rng(seed)
    half = crop // 2
    padded = np.pad(volume, ((0, 0), (half, half), (half, half)))

    def take(ks):
        images, targets = [], []
        for k in ks:
            ys, xs = np.nonzero(lobes[k])
            if len(ys) == 0:
                continue
            for j in rng.choice(len(ys), size=min(per_slice, len(ys)), replace=False):
                y, x = ys[j], xs[j]
                images.append(padded[k, y:y + crop, x:x + crop])
                targets.append(lobes[k, y, x] - 1)
        return torch.from_numpy(np.stack(images))[:, None].float(), torch.tensor(targets, dtype=torch.long)

    return Task("brain_mri lobe classification", "classification", classes, *take(train), *take(test))
