"""Linear probe (frozen encoder) and fine-tuning on a :class:`~tcm_mim.eval.tasks.Task`.

The encoder is the dense export of the pretrained sparse encoder (plain torch layers,
what a downstream user gets). Segmentation head: a 1x1 conv on all stages resized to
the stem's resolution and concatenated, logits upsampled to the image; classification
head: a linear layer on the mean of the deepest stage. Metrics: mean Dice over the
foreground classes (segmentation), accuracy (classification), on the test split.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models import export_dense
from .tasks import Task


def _stage_stack(features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], dim=1)


class _Head(nn.Module):
    def __init__(self, encoder: nn.Module, channels: list[int], task: Task, stem_stride: int):
        super().__init__()
        self.encoder, self.kind, self.stem_stride = encoder, task.kind, stem_stride
        n_out = len(task.classes)
        self.fc = nn.Conv2d(sum(channels), n_out, 1) if task.kind == "segmentation" else nn.Linear(channels[-1], n_out)

    def features(self, images: torch.Tensor):
        feats = self.encoder(images)
        if self.kind == "segmentation":
            h, w = images.shape[-2] // self.stem_stride, images.shape[-1] // self.stem_stride
            return _stage_stack(feats, (h, w))
        return feats[-1].mean(dim=(2, 3))

    def logits_from(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        out = self.fc(feats)
        return F.interpolate(out, size=image_size, mode="bilinear", align_corners=False) if self.kind == "segmentation" \
            else out


def _metric(logits: torch.Tensor, target: torch.Tensor, task: Task) -> float:
    pred = logits.argmax(1)
    if task.kind == "classification":
        return float((pred == target).float().mean())
    dices = []
    for c in range(1, len(task.classes)):
        p, t = pred == c, target == c
        if t.any():
            dices.append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
    return sum(dices) / len(dices)


def evaluate_encoder(sparse_encoder: nn.Module, task: Task, *, mode: str = "probe", steps: int = 150,
                     batch_size: int = 8, lr: float | None = None, seed: int = 0) -> float:
    """Train a head (``probe``) or head + encoder (``finetune``) on the task's train split; return the test metric."""
    return learning_curve(sparse_encoder, task, mode=mode, steps=steps, every=steps, batch_size=batch_size, lr=lr,
                          seed=seed)[-1]["test"]


def learning_curve(sparse_encoder: nn.Module, task: Task, *, mode: str = "probe", steps: int = 150,
                   every: int = 25, batch_size: int = 8, lr: float | None = None,
                   seed: int = 0) -> list[dict[str, float]]:
    """[{"step", "validation", "test"}] every ``every`` steps (and at ``steps``) of one probe / fine-tune run.

    ``validation`` is the metric on the task's validation split (carved from the training side; None when the
    task has none): the curve a step count is chosen from. The schedule is constant (Adam / AdamW, fixed lr) and
    evaluation runs in eval mode without gradients, so the model at step ``s`` of this run is the model of a run
    of ``s`` steps: the ``test`` value at ``s`` is what :func:`evaluate_encoder` with ``steps=s`` returns.
    """
    if mode not in ("probe", "finetune"):
        raise ValueError(f"evaluate_encoder: mode must be 'probe' or 'finetune', got {mode!r}")
    if every < 1:
        raise ValueError(f"learning_curve: every must be >= 1, got {every}")
    at = {s for s in range(every, steps + 1, every)} | {steps}
    curve = []
    torch.manual_seed(seed)
    encoder = export_dense(copy.deepcopy(sparse_encoder)).eval()
    model = _Head(encoder, list(sparse_encoder.channels), task, sparse_encoder.stem_stride)
    size = tuple(task.train_images.shape[-2:])
    gen = torch.Generator().manual_seed(seed)
    splits = {"test": (task.test_images, task.test_targets)}
    if task.val_images is not None:
        splits["validation"] = (task.val_images, task.val_targets)

    def point(step: int, logits_of) -> dict[str, float]:
        with torch.no_grad():
            scores = {name: _metric(logits_of(name), targets, task) for name, (_, targets) in splits.items()}
        return {"step": step, "validation": scores.get("validation"), "test": scores["test"]}

    if mode == "probe":
        with torch.no_grad():
            train_feats = torch.cat([model.features(x) for x in task.train_images.split(32)])
            feats = {name: torch.cat([model.features(x) for x in images.split(32)])
                     for name, (images, _) in splits.items()}
        opt = torch.optim.Adam(model.fc.parameters(), lr=lr or 1e-2)
        for step in range(1, steps + 1):
            idx = torch.randint(len(train_feats), (min(batch_size * 4, len(train_feats)),), generator=gen)
            loss = F.cross_entropy(model.logits_from(train_feats[idx], size), task.train_targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in at:
                curve.append(point(step, lambda name: torch.cat([model.logits_from(f, size)
                                                                 for f in feats[name].split(32)])))
        return curve
    opt = torch.optim.AdamW(model.parameters(), lr=lr or 1e-3, weight_decay=0.01)
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(task.train_images), (min(batch_size, len(task.train_images)),), generator=gen)
        logits = model.logits_from(model.features(task.train_images[idx]), size)
        loss = F.cross_entropy(logits, task.train_targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in at:
            model.eval()
            curve.append(point(step, lambda name: torch.cat([model.logits_from(model.features(x), size)
                                                             for x in splits[name][0].split(16)])))
    return curve
