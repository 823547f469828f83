"""3-D evaluation: a U-Net-style decoder on the exported dense 3-D encoder, patch training at the
pretraining crop size, full-volume sliding-window inference, per-class Dice and HD95.

Sliding-window inference (overlap, Gaussian weighting) and the metrics come from MONAI
(``monai.inferers.sliding_window_inference``, ``monai.metrics.compute_dice`` and
``compute_hausdorff_distance`` at the 95th percentile), the implementations the field compares
against, rather than written here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..models import export_dense


class UNetDecoder3D(nn.Module):
    """Encoder stages [B, C_i, *S / s_i] -> logits [B, classes, *S]: from the deepest stage, upsample to the
    next stage's size, concatenate it (skip), two 3x3x3 convs; the finest map is upsampled to the input."""

    def __init__(self, channels: Sequence[int], classes: int, width: int = 16):
        super().__init__()
        channels = list(channels)
        self.lateral = nn.Conv3d(channels[-1], width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(width + c, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True),
                          nn.Conv3d(width, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True))
            for c in reversed(channels[:-1]))
        self.out = nn.Conv3d(width, classes, 1)

    def forward(self, features: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = self.lateral(features[-1])
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False))


class VolumeSegmenter(nn.Module):
    """Dense encoder + :class:`UNetDecoder3D`: image [B, 1, *S] -> logits [B, classes, *S]."""

    def __init__(self, sparse_encoder: nn.Module, classes: int, width: int = 16):
        super().__init__()
        self.encoder = export_dense(copy.deepcopy(sparse_encoder))
        self.decoder = UNetDecoder3D(sparse_encoder.channels, classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x), x.shape[2:])


@dataclass
class VolumeScores:
    """Per foreground class (names ``classes[1:]``): Dice and HD95 (mm); NaN where a class is absent."""

    classes: tuple[str, ...]
    dice: list[float]
    hd95: list[float]

    @property
    def mean_dice(self) -> float:
        return float(np.nanmean(self.dice))


def sliding_window_predict(model: nn.Module, image: torch.Tensor, roi: int, *, overlap: float = 0.5,
                           sw_batch_size: int = 2) -> torch.Tensor:
    """Logits [1, classes, *S] of ``image`` [1, 1, *S]: windows of ``roi``^3 with ``overlap``, Gaussian-weighted."""
    require("monai", package="monai", purpose="3-D evaluation (sliding-window inference)")
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(image, (roi,) * 3, sw_batch_size, model, overlap=overlap, mode="gaussian")


def volume_scores(pred: torch.Tensor, target: torch.Tensor, classes: Sequence[str],
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> VolumeScores:
    """Dice and 95th-percentile Hausdorff distance (in the units of ``spacing``) per foreground class.

    NaN for a class absent from ``target``; HD95 of a class present but not predicted is the volume's
    diagonal (the worst possible distance).

    Args:
        pred, target: class indices long [*S] (0 = background).
        classes: names, background first.
    """
    require("monai", package="monai", purpose="3-D evaluation (Dice / HD95)")
    from monai.metrics import compute_dice, compute_hausdorff_distance

    n = len(classes)
    onehot = [F.one_hot(t.long(), n).movedim(-1, 0)[None].float() for t in (pred, target)]
    dice = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=True)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
        hd = compute_hausdorff_distance(onehot[0], onehot[1], include_background=False, percentile=95,
                                        spacing=list(spacing))[0]
    # A class present but never predicted has no surface to measure: it scores the volume's diagonal
    # (the worst distance possible), not NaN, so that predicting nothing cannot look good.
    worst = float(np.linalg.norm([(s - 1) * d for s, d in zip(target.shape, spacing)]))
    scores_dice, scores_hd = [], []
    for c in range(1, n):
        present, predicted = bool((target == c).any()), bool((pred == c).any())
        scores_dice.append(float(dice[c - 1]) if present else float("nan"))
        scores_hd.append(float("nan") if not present else float(hd[c - 1]) if predicted else worst)
    return VolumeScores(tuple(classes), scores_dice, scores_hd)


def _patch(image: torch.Tensor, target: torch.Tensor, roi: int, gen: torch.Generator):
    """One random roi^3 patch (zero-padded where the volume is smaller) of image [*S] and target [*S]."""
    pad = [max(roi - s, 0) for s in image.shape]
    spec = [p for d in reversed(pad) for p in (d // 2, d - d // 2)]
    image, target = F.pad(image, spec), F.pad(target, spec)
    starts = [int(torch.randint(s - roi + 1, (), generator=gen)) for s in image.shape]
    box = tuple(slice(a, a + roi) for a in starts)
    return image[box], target[box]


def train_volume_segmenter(sparse_encoder: nn.Module, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           classes: int, *, roi: int, mode: str = "finetune", steps: int = 100,
                           batch_size: int = 2, lr: float | None = None, seed: int = 0) -> VolumeSegmenter:
    """Train a :class:`VolumeSegmenter` on random ``roi``^3 patches of ``volumes`` (image float [*S] in [0, 1],
    target long [*S]); ``probe`` freezes the encoder (decoder only), ``finetune`` trains both."""
    if mode not in ("probe", "finetune"):
        raise ValueError(f"train_volume_segmenter: mode must be 'probe' or 'finetune', got {mode!r}")
    torch.manual_seed(seed)
    model = VolumeSegmenter(sparse_encoder, classes)
    if mode == "probe":
        model.encoder.requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or (1e-2 if mode == "probe" else 1e-3), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [_patch(*volumes[int(torch.randint(len(volumes), (), generator=gen))], roi, gen)
                 for _ in range(batch_size)]
        images = torch.stack([b[0] for b in batch])[:, None]
        targets = torch.stack([b[1] for b in batch])
        model.decoder.train()
        if mode == "finetune":
            model.encoder.train()
        loss = F.cross_entropy(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class VolumeTask:
    """3-D segmentation: train volumes (image float [*S] in [0, 1], target long [*S]) and test volumes."""

    name: str
    classes: tuple[str, ...]  # background first
    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    spacing: tuple[float, float, float]


def chest_organ_task_3d() -> VolumeTask:
    """The chest CT at 3-D: train on the slabs outside the held-out axial block and its guard bands (what
    pretraining reads), test on the block (the 2-D chest task's test slices), sliding window over it."""
    from ..data import load_embedded
    from .tasks import chest_organ_volume

    volume, target, classes, train, test = chest_organ_volume(144)
    spacing = tuple(float(s) for s in load_embedded("chest_ct")[0].spacing)

    def slab(ks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        runs = np.split(np.array(ks), np.nonzero(np.diff(ks) != 1)[0] + 1)
        return [(torch.from_numpy(volume[r[0]:r[-1] + 1]).float(), torch.from_numpy(target[r[0]:r[-1] + 1]).long())
                for r in runs if len(r)]

    return VolumeTask("chest_ct organ segmentation (3-D)", classes, slab(train), slab(test), spacing)


def evaluate_volume_task(sparse_encoder: nn.Module, task: VolumeTask, *, roi: int, mode: str = "finetune",
                         steps: int = 100, overlap: float = 0.5, seed: int = 0) -> VolumeScores:
    """Train on ``task.train`` patches, predict every test volume by sliding window, score each (Dice, HD95
    per class) and average over the test volumes where a class is present."""
    model = train_volume_segmenter(sparse_encoder, task.train, len(task.classes), roi=roi, mode=mode, steps=steps,
                                   seed=seed)
    scores = []
    for image, target in task.test:
        logits = sliding_window_predict(model, image[None, None], roi, overlap=overlap)
        scores.append(volume_scores(logits[0].argmax(0), target, task.classes, task.spacing))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every test volume stays NaN
        return VolumeScores(task.classes, np.nanmean([s.dice for s in scores], 0).tolist(),
                            np.nanmean([s.hd95 for s in scores], 0).tolist())
