"""The one split manifest shared by pretraining and evaluation (no leakage, checked in code).

A manifest says which data the evaluation tests on, so that pretraining never reads it:

* ``by="scan"`` (a user's folder or prepared corpus): whole scans (patients) are held out;
  pretraining drops them, and ``tcm-eval`` tests only on scans pretraining never read.
* ``by="block"`` (the single embedded volumes): axial blocks of the one scan are held out,
  each with a guard band of ``guard`` slices on both sides that neither side uses; pretraining
  reads only the slices outside blocks and bands.

The streams of ``tcm_mim.train.stream`` take a manifest and refuse (``LeakError``) any read
that touches a held-out scan or block, so the rule holds whatever sampling does.

TCM's guidance rule: on a scan that is both pretrained on and evaluated (a block split), the
prompts must select no label of a class the evaluation scores (:meth:`SplitManifest.check_guidance`);
with a scan split, pretraining never reads an evaluated (test) scan, so its guidance cannot
come from the test labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLIT_FILE = "split.json"
GUARD = 3
ORGANS = ("lung", "heart", "liver", "aorta", "vertebra")
LOBES = {
    "frontal": ("Frontal", "Precentral", "Rectus", "OFC", "Olfactory", "Supp_Motor"),
    "temporal": ("Temporal", "Hippocampus", "ParaHippocampal", "Amygdala", "Fusiform", "Heschl"),
    "parietal": ("Parietal", "Postcentral", "SupraMarginal", "Angular", "Precuneus"),
    "occipital": ("Occipital", "Calcarine", "Cuneus", "Lingual"),
    "cerebellum": ("Cerebellum", "Vermis"),
}
# What the embedded tasks score: dataset -> (class -> label-name substrings).
SCORED = {"chest_ct": {o: (o,) for o in ORGANS}, "brain_mri": LOBES}
# The full DRRs of load_embedded("chest_xray") project every slice of the chest CT, its test block included.
FULL_DRRS = ("chest_xray/drr_pa", "chest_xray/drr_lateral")


class LeakError(RuntimeError):
    """Pretraining tried to read a held-out (test) scan or block."""


def class_map(names: Mapping[int, str], groups: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, tuple[str, ...]]:
    """(lookup label id -> class index (0 = background) int64 [max id + 1], class names present)."""
    classes = tuple(g for g in groups if any(any(k.lower() in n.lower() for k in groups[g]) for n in names.values()))
    lut = np.zeros(max(names) + 1, dtype=np.int64)
    for label_id, name in names.items():
        for c, group in enumerate(classes, start=1):
            if any(k.lower() in name.lower() for k in groups[group]):
                lut[label_id] = c
                break
    return lut, classes


@dataclass
class SplitManifest:
    """Held-out scans or axial blocks.

    Attributes:
        by: ``"scan"`` or ``"block"``.
        test: scan keys held out whole (by scan).
        blocks: scan key -> held-out [lo, hi) ranges of its first (axial) axis (by block).
        guard: slices left out on both sides of every block.
        scored: class -> label-name substrings the evaluation scores (for the guidance rule).
        pretrained_on: content digests of the scans a pretraining run read (recorded by the trainer in
            ``<out_dir>/split.json``; ``tcm-eval`` tests only on scans outside it).
    """

    by: str
    test: list[str] = field(default_factory=list)
    blocks: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    guard: int = GUARD
    scored: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pretrained_on: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.by not in ("scan", "block"):
            raise ValueError(f"SplitManifest: by must be 'scan' or 'block', got {self.by!r}")
        self.blocks = {k: [tuple(map(int, b)) for b in v] for k, v in self.blocks.items()}
        self.scored = {k: tuple(v) for k, v in self.scored.items()}

    def pretrain_ranges(self, key: str, depth: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of the first axis pretraining may read of scan ``key`` (depth slices); [] if none."""
        if key in self.test:
            return []
        allowed, start = [], 0
        for lo, hi in sorted(self.blocks.get(key, [])):
            if lo - self.guard > start:
                allowed.append((start, lo - self.guard))
            start = max(start, hi + self.guard)
        if depth > start:
            allowed.append((start, depth))
        return allowed

    def check_read(self, key: str, lo: int, hi: int) -> None:
        """Raise :class:`LeakError` if slices [lo, hi) of scan ``key`` touch held-out data or a guard band."""
        if key in self.test:
            raise LeakError(f"pretraining read held-out test scan {key!r}")
        for b_lo, b_hi in self.blocks.get(key, []):
            if lo < b_hi + self.guard and hi > b_lo - self.guard:
                raise LeakError(f"pretraining read slices [{lo}, {hi}) of {key!r}, which touch the held-out block "
                                f"[{b_lo}, {b_hi}) or its guard band of {self.guard}")

    def check_guidance(self, prompts: Sequence[str], scans: Mapping[str, object], localizer) -> None:
        """Raise ValueError if a prompt selects a scored label on a block-split scan (guidance from test labels).

        Args:
            prompts: TCM's prompts.
            scans: scan key -> :class:`tcm_mim.localize.LabelMap` of the scans pretraining reads.
            localizer: has ``match(prompt, labels)`` returning the selected labels (``.name``).
        """
        for key, labels in scans.items():
            if key not in self.blocks or labels is None:
                continue
            for prompt in prompts:
                names = [m.name for m in localizer.match(prompt, labels)]
                hits = sorted({c for n in names for c, subs in self.scored.items()
                               if any(s.lower() in n.lower() for s in subs)})
                if hits:
                    raise ValueError(
                        f"split: prompt {prompt!r} selects labels {names} of scan {key!r}, which the evaluation "
                        f"scores as {hits}; TCM's guidance on evaluated data must not come from the evaluated "
                        f"labels: use prompts of other structures (scored classes: {sorted(self.scored)})")

    def as_dict(self) -> dict:
        return {"by": self.by, "test": list(self.test), "blocks": {k: [list(b) for b in v] for k, v in
                                                                  self.blocks.items()},
                "guard": self.guard, "scored": {k: list(v) for k, v in self.scored.items()},
                "pretrained_on": list(self.pretrained_on)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitManifest:
        return cls(**json.loads(Path(path).read_text()))


def middle_block(labelled: np.ndarray) -> tuple[int, int]:
    """[lo, hi): the middle quarter of the labelled slices (``labelled`` bool [D])."""
    idx = np.nonzero(labelled)[0]
    return int(idx[int(0.375 * len(idx))]), int(idx[int(0.625 * len(idx))])


def interleaved_blocks(labelled: np.ndarray, *, block: int = 6, period: int = 4, guard: int = GUARD
                       ) -> list[tuple[int, int]]:
    """Every ``period``-th block of ``block`` slices over the labelled range: every level of the
    axis (every lobe of the brain) has slices in train and test, so both can keep one class mix."""
    idx = np.nonzero(labelled)[0]
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return [(s, s + block) for s in range(lo + guard, hi - block - guard + 1, period * block)]


def block_slices(depth: int, blocks: Sequence[tuple[int, int]], labelled: np.ndarray,
                 guard: int = GUARD) -> tuple[list[int], list[int]]:
    """(train, test) labelled slice indices of a block split: test in the blocks, train outside blocks and bands."""
    manifest = SplitManifest("block", blocks={"_": list(blocks)}, guard=guard)
    train = [k for lo, hi in manifest.pretrain_ranges("_", depth) for k in range(lo, hi) if labelled[k]]
    test = [k for lo, hi in blocks for k in range(lo, hi) if labelled[k]]
    return train, test


def embedded_split(name: str, key: str, label_map: np.ndarray, label_names: Mapping[int, str]) -> SplitManifest:
    """The block manifest of an embedded volume: the chest CT holds out the middle quarter of its
    organ slices, the brain MRI interleaved axial blocks (same lobe mix in train and test). The chest
    radiographs hold out the full DRRs (they project the chest CT's test block): pretraining reads DRRs of
    the slabs outside it (:func:`tcm_mim.data.embedded.chest_xray_pretraining`)."""
    if name == "chest_xray":
        return SplitManifest("block", test=list(FULL_DRRS))
    scored = SCORED.get(name, {})
    if not scored:
        return SplitManifest("block", scored={})
    lut, _ = class_map(label_names, scored)
    labelled = lut[label_map.astype(np.int64)].reshape(label_map.shape[0], -1).max(1) > 0
    blocks = [middle_block(labelled)] if name == "chest_ct" else interleaved_blocks(labelled)
    return SplitManifest("block", blocks={key: blocks}, scored=scored)


def split_by_scan(keys: Sequence[str], *, test_fraction: float = 0.2, seed: int = 0) -> SplitManifest:
    """Hold out ``round(test_fraction * n)`` scans (at least 1, at most n - 1), chosen from ``seed``."""
    keys = sorted(keys)
    if len(keys) < 2:
        raise ValueError(f"split_by_scan: needs at least 2 scans to hold one out, got {len(keys)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"split_by_scan: test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(max(round(test_fraction * len(keys)), 1), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    return SplitManifest("scan", test=sorted(keys[i] for i in order[:n_test]))


def folds(keys: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """``keys`` in ``k`` disjoint folds of near-equal size (seeded order)."""
    keys = sorted(keys)
    if not 1 <= k <= len(keys):
        raise ValueError(f"folds: k must be in [1, {len(keys)}] (the number of scans), got {k}")
    order = np.random.default_rng(seed).permutation(len(keys))
    return [sorted(keys[i] for i in order[f::k]) for f in range(k)]


def label_subset(keys: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """``max(1, round(fraction * n))`` of the training scans ``keys`` (few-label settings), chosen from ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label_subset: fraction must be in (0, 1], got {fraction}")
    keys = sorted(keys)
    n = max(1, round(fraction * len(keys)))
    order = np.random.default_rng(seed + 7919).permutation(len(keys))
    return sorted(keys[i] for i in order[:n])
