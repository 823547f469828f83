"""Labelled downstream tasks: the embedded volumes (split by axial block) and a user's scans (split by scan).

The embedded tasks take their test slices from the split manifest pretraining uses
(:func:`tcm_mim.data.split.embedded_split`): held-out axial blocks with a guard band of
``GUARD`` slices on each side that neither pretraining, the probe nor fine-tuning reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Scan, load_embedded, normalize_intensity
from ..data.split import GUARD, LOBES, ORGANS, SCORED, block_slices, class_map, embedded_split, label_subset
from ..data.split import middle_block

__all__ = ["GUARD", "LOBES", "ORGANS", "Task", "brain_lobe_task", "chest_organ_task", "chest_organ_volume",
           "scan_task", "validation_blocks", "with_label_fraction"]

VAL_FRACTION = 0.2  # share of the labelled training slices the embedded tasks hold out for validation

@dataclass
class Task:
    """images float [M, 1, S, S] in [0, 1]; targets long [M, S, S] (segmentation) or [M] (classification).

    ``val_images`` / ``val_targets``: a validation split carved from the training side (disjoint from the
    training and the test images), what a step count is chosen on; None where the task has none."""

    name: str
    kind: str  # "segmentation" | "classification"
    classes: tuple[str, ...]  # index 0 is background for segmentation
    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor
    val_images: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (or centre-crop) the last two axes to ``size``."""
    starts = [max(d - size, 0) // 2 for d in x.shape[-2:]]
    x = x[..., starts[0]:starts[0] + size, starts[1]:starts[1] + size]
    pads = [((size - d) // 2, size - d - (size - d) // 2) for d in x.shape[-2:]]
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + pads)


def _split(labelled: np.ndarray) -> tuple[list[int], list[int]]:
    """(train, test) labelled slice indices of one volume (``labelled`` bool [D]) split by block: the middle
    quarter with guard bands, the rule of :mod:`tcm_mim.data.split` (tcm-finetune splits a lone volume so)."""
    return block_slices(len(labelled), [middle_block(labelled)], labelled)


def _embedded(name: str):
    """(scan, class lookup, class names, train slices, test slices) of an embedded volume, split as pretraining."""
    scan = load_embedded(name)[0]
    lut, classes = class_map(scan.label_names, SCORED[name])
    manifest = embedded_split(name, f"{name}/embedded", scan.label_map, scan.label_names)
    target = lut[scan.label_map.astype(np.int64)]
    labelled = target.reshape(target.shape[0], -1).max(1) > 0
    train, test = block_slices(target.shape[0], manifest.blocks[f"{name}/embedded"], labelled, manifest.guard)
    return scan, target, classes, train, test


def validation_blocks(train: list[int], test: list[int], *, fraction: float = VAL_FRACTION, guard: int = GUARD
                      ) -> tuple[list[int], list[int]]:
    """(train, validation) slice indices: the validation slices are the ``fraction`` of the training slices
    nearest to the test block, half on each side of it (the anatomy closest to what is tested), and a guard
    band of ``guard`` slices separates them from the remaining training slices (neighbouring slices are
    near-duplicates). ``train`` / ``test``: the block split's slice indices (:func:`block_slices`)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_blocks: fraction must be in (0, 1), got {fraction}")
    lo, hi = min(test), max(test)
    below, above = [k for k in train if k < lo], [k for k in train if k > hi]
    n = max(2, round(fraction * len(train)))
    n_below = min(len(below), n // 2) if above else min(len(below), n)
    n_above = min(len(above), n - n_below)
    val = below[len(below) - n_below:] + above[:n_above]
    if not val:
        raise ValueError(f"validation_blocks: no training slice to validate on (train {train}, test {test})")
    band = set()
    for part, n_part in ((below, n_below), (above, n_above)):
        if n_part:
            edge = part[len(part) - n_part] if part is below else part[n_part - 1]
            band |= set(range(edge - guard, edge)) if part is below else set(range(edge + 1, edge + guard + 1))
    return [k for k in train if k not in val and k not in band], val


def with_label_fraction(task: Task, fraction: float, seed: int) -> Task:
    """The task with the labels of ``max(1, round(fraction * n))`` of its ``n`` training images, chosen from
    ``seed`` (the few-label setting; the embedded volumes have one scan, so the unit is the slice / crop)."""
    if fraction == 1.0:
        return task
    keep = label_subset(list(range(len(task.train_images))), fraction, seed)
    return dataclasses.replace(task, train_images=task.train_images[keep], train_targets=task.train_targets[keep])


def chest_organ_volume(size: int = 160) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[int], list[int]]:
    """The chest CT as (image float32 [D, size, size] in [0, 1], organ classes int64 [D, size, size],
    class names with background first, train slice indices, test slice indices (held-out axial block))."""
    scan, target, classes, train, test = _embedded("chest_ct")
    volume = _pad_to(normalize_intensity(scan.image, "CT"), size)
    return volume, _pad_to(target, size), ("background", *classes), train, test


def chest_organ_task(size: int = 160, *, validation: bool = False) -> Task:
    """Axial chest-CT slices (2.5 mm, padded to ``size``) with organ classes (background + ORGANS present).

    ``validation``: hold out the training slices next to the test block (:func:`validation_blocks`)."""
    volume, target, classes, train, test = chest_organ_volume(size)
    val = None
    if validation:
        train, val = validation_blocks(train, test)

    def take(ks):
        return torch.from_numpy(volume[ks])[:, None].float(), torch.from_numpy(target[ks]).long()

    return Task("chest_ct organ segmentation", "segmentation", classes, *take(train), *take(test),
                *(take(val) if val else (None, None)))


def stratified_points(classes: np.ndarray, slices: list[int], per_class: int, rng: np.random.Generator
                      ) -> list[tuple[int, int, int]]:
    """``per_class`` (slice, y, x) points of every class c >= 1 in ``classes`` [D, H, W] restricted to ``slices``
    (fewer where a class has fewer voxels there): equal counts, so every split built this way has one class mix."""
    points = []
    sub = classes[slices]
    for c in range(1, int(classes.max()) + 1):
        ks, ys, xs = np.nonzero(sub == c)
        for j in rng.choice(len(ks), size=min(per_class, len(ks)), replace=False):
            points.append((slices[ks[j]], int(ys[j]), int(xs[j])))
    return points


def brain_lobe_task(crop: int = 32, per_class: int = 96, seed: int = 0, *, validation: bool = False) -> Task:
    """Crops of axial brain-MRI slices classified by the lobe of their centre voxel (AAL3 groups).

    Train and test crops come from the interleaved axial blocks of the brain's split manifest (every
    lobe has slices on both sides) and are stratified: ``per_class`` crops of every lobe in each, so
    train and test have the same class mix (chance accuracy 1 / classes). ``validation``: every fifth
    training slice gives stratified validation crops instead (spread over every level, so the same class mix).
    """
    scan, lobes, classes, train, test = _embedded("brain_mri")
    val = None
    if validation:
        train, val = [k for i, k in enumerate(train) if i % 5 != 2], train[2::5]
    volume = normalize_intensity(scan.image, "MR")
    rng = np.random.default_rng(seed)
    half = crop // 2
    padded = np.pad(volume, ((0, 0), (half, half), (half, half)))
    n = min(int(np.bincount((lobes[ks]).ravel(), minlength=len(classes) + 1)[1:].min())
            for ks in (train, test, *([val] if val else [])))
    per_class = min(per_class, n)

    def take(ks):
        points = stratified_points(lobes, ks, per_class, rng)
        images = np.stack([padded[k, y:y + crop, x:x + crop] for k, y, x in points])
        targets = [lobes[k, y, x] - 1 for k, y, x in points]
        return torch.from_numpy(images)[:, None].float(), torch.tensor(targets, dtype=torch.long)

    return Task("brain_mri lobe classification", "classification", classes, *take(train), *take(test),
                *(take(val) if val else (None, None)))


def scan_task(scans: dict[str, Scan], train: list[str], test: list[str], kind: str, *, size: int = 128,
              crop: int = 32, per_class: int = 96, seed: int = 0) -> Task:
    """A 2-D task on a user's labelled scans, split by scan (``train`` / ``test``: scan keys, disjoint).

    segmentation: every axial slice with a label (a 2-D image is its own slice), padded or centre-cropped
    to ``size``, classes = background + every label id of the scans (contiguous, named by the label names).
    classification: ``crop``-sided crops classified by the label of their centre voxel, ``per_class``
    crops of every label from each side (stratified: one class mix).
    """
    if kind not in ("segmentation", "classification"):
        raise ValueError(f"scan_task: kind must be 'segmentation' or 'classification', got {kind!r}")
    shared = sorted(set(train) & set(test))
    if shared:
        raise ValueError(f"scan_task: train and test must not share a scan, got {shared}")
    missing = [k for k in (*train, *test) if k not in scans or scans[k].label_map is None]
    if missing:
        raise ValueError(f"scan_task: scans {missing} are not in the dataset or have no label map")
    ids = sorted({int(i) for k in (*train, *test) for i in np.unique(scans[k].label_map) if i > 0})
    names = {}
    for k in (*train, *test):
        names.update({i: n for i, n in scans[k].label_names.items() if i in ids})
    lut = np.zeros(max(ids, default=0) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    classes = ("background", *(names.get(i, f"label {i}") for i in ids))

    def volume(k: str) -> tuple[np.ndarray, np.ndarray]:
        s = scans[k]
        image, target = normalize_intensity(s.image, s.modality), lut[s.label_map.astype(np.int64)]
        return (image, target) if image.ndim == 3 else (image[None], target[None])

    rng = np.random.default_rng(seed)
    if kind == "segmentation":
        def take(keys):
            images, targets = [], []
            for k in keys:
                image, target = volume(k)
                ks = np.nonzero(target.reshape(target.shape[0], -1).max(1) > 0)[0]
                images.append(_pad_to(image[ks], size))
                targets.append(_pad_to(target[ks], size))
            return torch.from_numpy(np.concatenate(images))[:, None].float(), \
                torch.from_numpy(np.concatenate(targets)).long()

        return Task("segmentation (by scan)", "segmentation", classes, *take(train), *take(test))

    half = crop // 2

    def take(keys):
        images, targets = [], []
        for k in keys:
            image, target = volume(k)
            padded = np.pad(image, ((0, 0), (half, half), (half, half)))
            for d, y, x in stratified_points(target, list(range(target.shape[0])), per_class, rng):
                images.append(padded[d, y:y + crop, x:x + crop])
                targets.append(target[d, y, x] - 1)
        return torch.from_numpy(np.stack(images))[:, None].float(), torch.tensor(targets, dtype=torch.long)

    return Task("classification (by scan)", "classification", classes[1:], *take(train), *take(test))
