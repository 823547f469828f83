"""Labelled / unlabelled / test splits for segmentation fine-tuning.

Train and test never share anatomy: the embedded chest CT (one volume) is split by the
held-out axial block of :func:`tcm_mim.eval.tasks.chest_organ_volume` (test = the middle
quarter of the labelled slices, a guard band of ``GUARD`` slices on each side dropped);
a folder of several labelled scans is split by scan (the last fifth, at least one, in
name order, is the test set), a folder of one volume by the same axial block. Then
``label_fraction`` of the training samples keep their labels (whole scans when the
training set has several scans, else slices / sub-volumes), drawn with ``seed``; the
others are the unlabelled pool. Samples are 2-D axial slices holding foreground, or 3-D
slabs of ``depth`` consecutive slices.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from ..data import FolderDataset, normalize_intensity
from ..errors import UserError
from ..eval.tasks import _pad_to, _split, chest_organ_volume
from .config import FinetuneConfig

TEST_SHARE = 0.2  # folders of several scans: share of scans held out for testing


@dataclass
class SegmentationSplit:
    """images float [N, 1, *S] in [0, 1]; targets int64 [N, *S] with 0 = background."""

    classes: tuple[str, ...]
    labelled_images: torch.Tensor
    labelled_targets: torch.Tensor
    unlabelled_images: torch.Tensor  # their labels are never read
    test_images: torch.Tensor
    test_targets: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"labelled": len(self.labelled_images), "unlabelled": len(self.unlabelled_images),
                "test": len(self.test_images)}


def _samples(volume: np.ndarray, target: np.ndarray, slices: list[int], dim: int, depth: int, stride: int):
    """2-D: the listed slices; 3-D: slabs of ``depth`` consecutive listed slices every ``stride``."""
    if dim == 2:
        return [(volume[k][None], target[k]) for k in slices]
    out, run = [], []
    for k in [*slices, None]:  # None closes the last run of consecutive indices
        if k is not None and (not run or k == run[-1] + 1):
            run.append(k)
            continue
        for start in range(0, len(run) - depth + 1, stride):
            ks = run[start:start + depth]
            out.append((volume[ks][None], target[ks]))
        run = [k]
    return out


def _stack(samples) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([s[0] for s in samples]).astype(np.float32)
    targets = np.stack([s[1] for s in samples]).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(targets)


def _labelled_groups(groups: list[int], fraction: float, need_unlabelled: bool, seed: int) -> set[int]:
    distinct = sorted(set(groups))
    n = max(1, round(fraction * len(distinct)))
    if need_unlabelled and n >= len(distinct):
        raise UserError(f"label_fraction {fraction} keeps labels on all {len(distinct)} training groups, "
                         f"none is left unlabelled; lower label_fraction or use semi=none")
    order = np.random.default_rng(seed).permutation(len(distinct))
    return {distinct[i] for i in order[:n]}


def _volumes(cfg: FinetuneConfig):
    """[(image float32 [D, S, S], classes int64 [D, S, S])], class names, per-volume (train, test) slices."""
    if cfg.task == "chest_ct":
        volume, target, classes, train, test = chest_organ_volume(cfg.image_size)
        return [(volume, target)], classes, [(train, test)], [0]
    root = pathlib.Path(cfg.task)
    scans = FolderDataset(root, label_dir=cfg.label_dir, label_names=cfg.label_names).scans
    ids = sorted({int(i) for s in scans for i in np.unique(s.label_map)} - {0})
    if not ids:
        raise UserError(f"FinetuneConfig: the label maps under {cfg.label_dir} hold no foreground label")
    names = {i: n for s in scans for i, n in s.label_names.items()}
    lut = np.zeros(max(ids) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    vols = []
    for s in scans:
        image, labels = normalize_intensity(s.image, s.modality), lut[s.label_map]
        if image.ndim == 2:
            if cfg.dim == 3:
                raise UserError(f"FinetuneConfig: dim 3 needs volumes, but {s.name} is 2-D")
            image, labels = image[None], labels[None]
        vols.append((_pad_to(image, cfg.image_size), _pad_to(labels, cfg.image_size)))
    classes = ("background", *(names.get(i, f"label_{i}") for i in ids))
    has_fg = [t.reshape(t.shape[0], -1).max(1) > 0 for _, t in vols]
    if len(vols) == 1:
        return vols, classes, [_split(has_fg[0])], [0]
    fg = [np.nonzero(f)[0].tolist() for f in has_fg]
    n_test = max(1, round(TEST_SHARE * len(vols)))
    splits = [(fg[i], []) if i < len(vols) - n_test else ([], fg[i]) for i in range(len(vols))]
    return vols, classes, splits, list(range(len(vols)))


def build_split(cfg: FinetuneConfig) -> SegmentationSplit:
    """Labelled, unlabelled and test samples for ``cfg`` (see the module docstring for the rules)."""
    vols, classes, splits, scan_ids = _volumes(cfg)
    train, groups, test = [], [], []
    for (volume, target), (tr, te), scan_id in zip(vols, splits, scan_ids):
        for sample in _samples(volume, target, tr, cfg.dim, cfg.depth, max(cfg.depth // 2, 1)):
            train.append(sample)
            groups.append(scan_id)
        test.extend(_samples(volume, target, te, cfg.dim, cfg.depth, cfg.depth))
    if not train or not test:
        what = f"{cfg.depth}-slice slabs" if cfg.dim == 3 else "slices with foreground"
        raise UserError(f"FinetuneConfig: the split of {cfg.task!r} has {len(train)} training and {len(test)} test "
                         f"{what}; both need at least one (lower depth, or add scans)")
    if len(set(groups)) < 2:  # one training scan: label slices / slabs, not scans
        groups = list(range(len(train)))
    keep = _labelled_groups(groups, cfg.label_fraction, cfg.semi != "none", cfg.seed)
    labelled = [s for s, g in zip(train, groups) if g in keep]
    unlabelled = [s for s, g in zip(train, groups) if g not in keep]
    lab_x, lab_y = _stack(labelled)
    test_x, test_y = _stack(test)
    unl_x = _stack(unlabelled)[0] if unlabelled else lab_x[:0]
    return SegmentationSplit(classes, lab_x, lab_y, unl_x, test_x, test_y)
