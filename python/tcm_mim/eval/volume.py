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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._deps import require
from ..models import export_dense


class UNetDecoder3D(nn.Module):
    """Encoder stages [B, C_i, *S / s_i] -> logits [B, classes, *S]: from the deepest stage, upsample to the
    next stage's size, concatenate it (skip), two 3x3x3 convs; the finest map is upsampled to the input.

    Instance norm, as nnU-Net's 3-D decoders: with batches of 2-4 foreground-oversampled patches, batch-norm
    running statistics do not match whole-volume inference (measured: the validation Dice of a batch-norm
    decoder swung between 0.03 and 0.17 from one 100-step point to the next)."""

    def __init__(self, channels: Sequence[int], classes: int, width: int = 16):
        super().__init__()
        channels = list(channels)
        self.lateral = nn.Conv3d(channels[-1], width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(width + c, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True),
                          nn.ReLU(inplace=True),
                          nn.Conv3d(width, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True),
                          nn.ReLU(inplace=True))
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
    """Logits [1, classes, *S] (on the CPU) of ``image`` [1, 1, *S]: windows of ``roi``^3 with ``overlap``,
    Gaussian-weighted, computed on the device of ``model``."""
    require("monai", package="monai", purpose="3-D evaluation (sliding-window inference)")
    from monai.inferers import sliding_window_inference

    device = next(model.parameters(), torch.empty(0)).device  # the model's (a GPU node evaluates on its GPU)
    with torch.no_grad():
        return sliding_window_inference(image.to(device), (roi,) * 3, sw_batch_size, model, overlap=overlap,
                                        mode="gaussian").cpu()


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


@dataclass(frozen=True)
class VolumeProtocol:
    """How a :class:`VolumeSegmenter` is trained, the same for every method compared.

    ``foreground``: the share of patches centred on a voxel of a foreground class (the class drawn
    uniformly among those present in the volume, nnU-Net's oversampling), the rest anywhere; without it
    most 2.5 mm patches of a chest CT hold only background and the small organs are almost never seen.
    Loss: MONAI's ``DiceCELoss`` (soft Dice + cross-entropy, the nnU-Net loss), AdamW, the learning rate
    decayed to 0 over the run's steps by a cosine (measured: at a constant 1e-3 the validation Dice of one
    run jumped between 0.01 and 0.14 from one 100-step point to the next, so the last step's score was noise).
    """

    batch_size: int = 2
    lr_probe: float = 3e-3
    lr_finetune: float = 1e-3
    width: int = 16
    foreground: float = 0.5
    overlap: float = 0.5

    def __post_init__(self):
        for name in ("batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"VolumeProtocol: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.foreground <= 1:
            raise ValueError(f"VolumeProtocol: foreground must be in [0, 1], got {self.foreground}")


class _PatchSampler:
    """Random roi^3 patches (zero-padded where a volume is smaller) of (image [*S], target [*S]) volumes.

    MONAI's ``RandCropByLabelClasses`` draws the same class-balanced centres, but from NumPy's random state;
    here every draw comes from one ``torch.Generator``, so for one seed every method sees the very same
    patches (the comparison is paired) whatever the model does."""

    def __init__(self, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]], roi: int, foreground: float,
                 gen: torch.Generator):
        self.roi, self.foreground, self.gen = roi, foreground, gen
        self.volumes = []
        for image, target in volumes:
            pad = [max(roi - s, 0) for s in image.shape]
            spec = [p for d in reversed(pad) for p in (d // 2, d - d // 2)]
            image, target = F.pad(image, spec), F.pad(target, spec)
            flat = target.flatten()
            voxels = [torch.nonzero(flat == c)[:, 0] for c in range(1, int(flat.max()) + 1)]
            self.volumes.append((image, target, [v for v in voxels if len(v)]))

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.gen))

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        image, target, voxels = self.volumes[self._randint(len(self.volumes))]
        shape = image.shape
        if voxels and float(torch.rand((), generator=self.gen)) < self.foreground:
            of_class = voxels[self._randint(len(voxels))]
            centre = np.unravel_index(int(of_class[self._randint(len(of_class))]), tuple(shape))
            starts = [min(max(int(c) - self.roi // 2, 0), s - self.roi) for c, s in zip(centre, shape)]
        else:
            starts = [self._randint(s - self.roi + 1) for s in shape]
        box = tuple(slice(a, a + self.roi) for a in starts)
        return image[box], target[box]


def mean_dice(model: nn.Module, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]], classes: int, roi: int,
              overlap: float = 0.5) -> float:
    """Mean over ``volumes`` of the mean foreground Dice (classes present) of sliding-window predictions;
    target voxels -1 are context (predicted, not scored)."""
    require("monai", package="monai", purpose="3-D evaluation (Dice)")
    from monai.metrics import compute_dice

    values = []
    for image, target in volumes:
        pred = sliding_window_predict(model, image[None, None], roi, overlap=overlap)[0].argmax(0)
        scored = target >= 0  # -1: context voxels, seen by the model but not scored
        pred, target = pred * scored, target * scored
        onehot = [F.one_hot(t.long(), classes).movedim(-1, 0)[None].float() for t in (pred, target)]
        dice = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=True)[0]
        values.append(float(np.nanmean(dice.numpy())))
    return float(np.mean(values))


def train_volume_segmenter(sparse_encoder: nn.Module, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
                           classes: int, *, roi: int, mode: str = "finetune", steps: int = 100,
                           protocol: VolumeProtocol = VolumeProtocol(), seed: int = 0,
                           val: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), every: int = 0,
                           snapshots: dict[int, dict] | None = None) -> tuple[VolumeSegmenter, list]:
    """Train a :class:`VolumeSegmenter` on ``roi``^3 patches of ``volumes`` (image float [*S] in [0, 1], target
    long [*S]); ``probe`` freezes the encoder (decoder only), ``finetune`` trains both; on the device of
    ``sparse_encoder`` (a pretraining run on a GPU evaluates on it).

    Returns (model in eval mode, learning curve): with ``every`` > 0 and ``val`` volumes, the curve is
    [(step, validation mean Dice)] every ``every`` steps (and at ``steps``), and ``snapshots[step]`` (if given)
    receives a copy of the model's state there, so that a step count chosen later from the curves can be
    evaluated without training again."""
    if mode not in ("probe", "finetune"):
        raise ValueError(f"train_volume_segmenter: mode must be 'probe' or 'finetune', got {mode!r}")
    if every < 0:
        raise ValueError(f"train_volume_segmenter: every must be >= 0, got {every}")
    require("monai", package="monai", purpose="3-D evaluation (Dice + cross-entropy loss)")
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    device = next(sparse_encoder.parameters()).device  # train where the pretrained encoder lives
    model = VolumeSegmenter(sparse_encoder, classes, protocol.width).to(device)
    if mode == "probe":
        model.encoder.requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = protocol.lr_probe if mode == "probe" else protocol.lr_finetune
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    sample = _PatchSampler(volumes, roi, protocol.foreground, torch.Generator().manual_seed(seed))
    at = set(range(every, steps + 1, every)) | {steps} if every else set()
    curve = []
    for step in range(1, steps + 1):
        batch = [sample() for _ in range(protocol.batch_size)]
        images = torch.stack([b[0] for b in batch])[:, None].to(device)
        targets = torch.stack([b[1] for b in batch])[:, None].to(device)
        model.decoder.train()
        if mode == "finetune":
            model.encoder.train()
        loss = loss_fn(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step in at and val:
            model.eval()
            curve.append((step, mean_dice(model, val, classes, roi, protocol.overlap)))
            if snapshots is not None:
                snapshots[step] = copy.deepcopy(model.state_dict())
    return model.eval(), curve


@dataclass
class VolumeTask:
    """3-D segmentation: train volumes (image float [*S] in [0, 1], target long [*S]), test volumes, and
    validation volumes from the training side (learning curves; never the test volumes)."""

    name: str
    classes: tuple[str, ...]  # background first
    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    spacing: tuple[float, float, float]
    val: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


VAL_SLICES = 16


def chest_organ_task_3d(validation: bool = True) -> VolumeTask:
    """The chest CT at 3-D: test on the held-out axial block (the 2-D chest task's test slices) by sliding
    window; train on the slabs outside it and its guard bands (what pretraining reads).

    ``validation``: the ``VAL_SLICES`` training slices just below the test block's guard band are the
    validation block (learning curves), separated from the remaining training slices by a guard band of
    ``GUARD``. Below, not above: the slices above the block are the only training slices with heart, those
    below hold lung, liver, aorta and vertebra (all but heart), so the curves see four of the five organs.
    The validation volume is the block with ``VAL_SLICES`` slices of context below it (target -1 there:
    predicted, not scored): a 16-slice volume alone would be zero-padded to the patch depth, and the
    instance-normed encoder then sees half a window of padding it never trained on (measured: validation
    Dice near 0 for every run while the test block, deep enough, scored the lungs at 0.5)."""
    from ..data import load_embedded
    from ..data.split import GUARD
    from .tasks import chest_organ_volume

    volume, target, classes, train, test = chest_organ_volume(144)
    spacing = tuple(float(s) for s in load_embedded("chest_ct")[0].spacing)
    val: list[int] = []
    if validation:
        val = [k for k in train if k < test[0]][-VAL_SLICES:]
        train = [k for k in train if k < val[0] - GUARD or k > test[-1]]

    def slab(ks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        runs = np.split(np.array(ks), np.nonzero(np.diff(ks) != 1)[0] + 1)
        return [(torch.from_numpy(volume[r[0]:r[-1] + 1]).float(), torch.from_numpy(target[r[0]:r[-1] + 1]).long())
                for r in runs if len(r)]

    context = []
    if val:
        lo = max(val[0] - VAL_SLICES, 0)
        image = torch.from_numpy(volume[lo:val[-1] + 1]).float()
        labels = torch.from_numpy(target[lo:val[-1] + 1]).clone()  # not a view: the training slab shares it
        labels[:val[0] - lo] = -1
        context = [(image, labels)]
    return VolumeTask("chest_ct organ segmentation (3-D)", classes, slab(train), slab(test), spacing, context)


def score_volumes(model: nn.Module, volumes: Sequence[tuple[torch.Tensor, torch.Tensor]], classes: Sequence[str],
                  spacing: Sequence[float], roi: int, overlap: float = 0.5) -> VolumeScores:
    """Sliding-window prediction of every volume, scored (Dice, HD95 per class) and averaged over the volumes
    where a class is present."""
    scores = []
    for image, target in volumes:
        logits = sliding_window_predict(model, image[None, None], roi, overlap=overlap)
        scores.append(volume_scores(logits[0].argmax(0), target, classes, spacing))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every volume stays NaN
        return VolumeScores(tuple(classes), np.nanmean([s.dice for s in scores], 0).tolist(),
                            np.nanmean([s.hd95 for s in scores], 0).tolist())


def evaluate_volume_task(sparse_encoder: nn.Module, task: VolumeTask, *, roi: int, mode: str = "finetune",
                         steps: int = 100, protocol: VolumeProtocol = VolumeProtocol(), seed: int = 0
                         ) -> VolumeScores:
    """Train on ``task.train`` patches for ``steps`` steps, score the test volumes (:func:`score_volumes`)."""
    model, _ = train_volume_segmenter(sparse_encoder, task.train, len(task.classes), roi=roi, mode=mode,
                                      steps=steps, protocol=protocol, seed=seed)
    return score_volumes(model, task.test, task.classes, task.spacing, roi, protocol.overlap)
