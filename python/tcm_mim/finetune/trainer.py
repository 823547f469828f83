"""The fine-tuning loop: supervised, mean teacher or CORN, then the test Dice.

Per step: a labelled batch (with ``--semi none`` nothing else); for ``mean_teacher`` and
``corn`` also an unlabelled batch, seen by the EMA teacher with noise and by the student
with noise, intensity jitter and flips (undone on its outputs). The loss is

    supervised + rampup(step) * (w_cons * consistency + w_ccm * CCM + w_dfp * DFP)

and a term whose weight is 0 is not computed at all (ablations are runs, not code changes).
"""

from __future__ import annotations

import copy
import csv
import json
import pathlib
import time

import torch

from ..models import build_encoder
from ..train import checkpoint
from ..errors import UserError
from .config import FinetuneConfig
from .data import SegmentationSplit, build_split
from .losses import (DynamicFeaturePool, ccm_loss, consistency_loss, ema_update, feature_rows, perturb,
                     sigmoid_rampup, similarity_consistency_loss, supervised_loss, teacher_confidence,
                     to_feature_grid)
from .model import SegmentationNet, load_pretrained_encoder

LOG_FIELDS = ("step", "loss", "supervised", "consistency", "ccm", "dfp", "rampup", "confident_rows", "pool_rows",
              "seconds")


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else CPU; anything else as given (FinetuneConfig checked it is available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """Dice of each foreground class over the whole set (pred, target int [N, *S]); classes absent from
    the target are left out."""
    out = {}
    for c, name in enumerate(classes[1:], start=1):
        p, t = pred == c, target == c
        if t.any():
            out[name] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return out


@torch.no_grad()
def predict(model: SegmentationNet, images: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """Class map int64 [N, *S] of images [N, 1, *S] (model in eval mode, batches of ``batch``)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x.to(device))[0].argmax(1).cpu() for x in images.split(batch)])
    model.train(was_training)
    return out


class FineTuner:
    """Holds the student (and teacher, pool) for one config; :meth:`run` trains and evaluates."""

    def __init__(self, cfg: FinetuneConfig, split: SegmentationSplit | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.split = split if split is not None else build_split(cfg)
        if cfg.semi != "none" and len(self.split.unlabelled_images) == 0:
            raise UserError(f"FinetuneConfig: semi={cfg.semi!r} needs unlabelled samples, the split has none")
        torch.manual_seed(cfg.seed)  # the random initialisation (decoder, and the encoder without a checkpoint)
        if cfg.checkpoint:
            encoder = load_pretrained_encoder(cfg.checkpoint, cfg.encoder, cfg.dim)
        else:
            encoder = build_encoder(cfg.encoder, dim=cfg.dim, in_channels=1)
        self.num_classes = len(self.split.classes)
        self.student = SegmentationNet(encoder, self.num_classes, dim=cfg.dim,
                                       decoder_width=cfg.decoder_width).to(self.device)
        sizes = {"image_size": cfg.image_size, **({"depth": cfg.depth} if cfg.dim == 3 else {})}
        for name, value in sizes.items():
            if value % self.student.stride:
                raise UserError(f"FinetuneConfig: {name} must be a multiple of encoder {cfg.encoder!r}'s stride "
                                f"{self.student.stride}, got {value}")
        self.teacher = None
        if cfg.uses_teacher:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.pool = None
        if cfg.semi == "corn" and cfg.dfp_weight > 0:
            self.pool = DynamicFeaturePool(self.student.feature_channels, cfg.pool_size, cfg.tau).to(self.device)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.steps)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.out = pathlib.Path(cfg.out_dir)

    def _batch(self, images: torch.Tensor, n: int, targets: torch.Tensor | None = None):
        idx = torch.randint(len(images), (n,), generator=self.gen)
        x = images[idx].to(self.device)
        return (x, targets[idx].to(self.device)) if targets is not None else x

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the logged terms (0 where a term is off)."""
        cfg = self.cfg
        x_l, y_l = self._batch(self.split.labelled_images, cfg.batch_size, self.split.labelled_targets)
        zero = torch.zeros((), device=self.device)
        terms = {"consistency": zero, "ccm": zero, "dfp": zero}
        ramp, confident = 0.0, 0
        if self.teacher is None:
            logits_l, _ = self.student(x_l)
        else:
            x_u = self._batch(self.split.unlabelled_images, cfg.unlabelled_batch_size)
            x_t, _ = perturb(x_u, noise_std=cfg.noise_std, intensity=0.0, flip=False, gen=self.gen)
            x_s, axes = perturb(x_u, noise_std=cfg.noise_std, intensity=cfg.intensity, flip=True, gen=self.gen)
            logits, feats = self.student(torch.cat([x_l, x_s]))
            n = len(x_l)
            logits_l, logits_s, feats_l, feats_s = logits[:n], logits[n:], feats[:n], feats[n:]
            if axes:  # back to the teacher's orientation
                logits_s, feats_s = logits_s.flip(axes), feats_s.flip(axes)
            with torch.no_grad():
                t_logits, t_feats = self.teacher(x_t)
            ramp = sigmoid_rampup(self.step, cfg.rampup_steps)
            if cfg.consistency_weight > 0:
                terms["consistency"] = consistency_loss(logits_s, t_logits)
            if cfg.semi == "corn" and (cfg.ccm_weight > 0 or cfg.dfp_weight > 0):
                grid = tuple(feats_s.shape[2:])
                pseudo, conf = (t.reshape(-1) for t in teacher_confidence(t_logits, grid))
                rows_s, rows_t = feature_rows(feats_s), feature_rows(t_feats)
                keep = conf > cfg.tau
                confident = int(keep.sum())
                if cfg.ccm_weight > 0:
                    labels = to_feature_grid(y_l, grid).reshape(-1)
                    terms["ccm"] = ccm_loss(feature_rows(feats_l), labels, rows_s, pseudo, keep, self.num_classes,
                                            max_rows=cfg.max_rows, gen=self.gen)
                if self.pool is not None:
                    sel_s, sel_t = self.pool.select(rows_s, conf), self.pool.select(rows_t, conf)
                    if len(sel_t) > cfg.max_rows:  # the same sites for student and teacher
                        idx = torch.randperm(len(sel_t), generator=self.gen)[:cfg.max_rows].to(self.device)
                        sel_s, sel_t = sel_s[idx], sel_t[idx]
                    if len(self.pool) >= 2 and len(sel_t) > 0:
                        terms["dfp"] = similarity_consistency_loss(sel_s, sel_t, self.pool.rows(),
                                                                   cfg.similarity_temperature)
                    if len(sel_t) > 0:
                        self.pool.push(sel_t)
        sup = supervised_loss(logits_l, y_l)
        loss = sup + ramp * (cfg.consistency_weight * terms["consistency"] + cfg.ccm_weight * terms["ccm"]
                             + cfg.dfp_weight * terms["dfp"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tcm-finetune: non-finite loss at step {self.step}: supervised {float(sup)}, "
                                     + ", ".join(f"{k} {float(v)}" for k, v in terms.items()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.teacher is not None:
            ema_update(self.teacher, self.student, cfg.ema, self.step)
        self.step += 1
        return {"loss": float(loss.detach()), "supervised": float(sup.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "rampup": ramp, "confident_rows": confident, "pool_rows": len(self.pool) if self.pool else 0}

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "pool": self.pool.state_dict() if self.pool is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "config": self.cfg.to_dict(), "classes": list(self.split.classes)}

    def evaluate(self) -> dict:
        """Test Dice per class and its mean, for the student (and the teacher when there is one)."""
        batch = 8 if self.cfg.dim == 2 else 1
        out = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            if model is None:
                continue
            per_class = dice_per_class(predict(model, self.split.test_images, self.device, batch),
                                       self.split.test_targets, self.split.classes)
            out[name] = {"dice": sum(per_class.values()) / max(len(per_class), 1), "per_class": per_class}
        return out

    def run(self, *, progress: bool = False) -> dict:
        """Train for ``cfg.steps``, write log.csv, checkpoint.pt and result.json under ``out_dir``; return the result."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with (self.out / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            while self.step < cfg.steps:
                row = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    writer.writerow({"step": self.step, **row, "seconds": round(time.perf_counter() - start, 2)})
                    f.flush()
                    if progress:
                        print(f"step {self.step}/{cfg.steps} loss {row['loss']:.4f} sup {row['supervised']:.4f} "
                              f"cons {row['consistency']:.4f} ccm {row['ccm']:.4g} dfp {row['dfp']:.4g}", flush=True)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    checkpoint.save(self.state_dict(), self.out / "checkpoint.pt")
        train_s = time.perf_counter() - start
        scores = self.evaluate()
        result = {"config": cfg.to_dict(), "classes": list(self.split.classes), "sizes": self.split.sizes(),
                  "device": str(self.device), "train_seconds": round(train_s, 2),
                  "dice": scores["student"]["dice"], "scores": scores}
        (self.out / "result.json").write_text(json.dumps(result, indent=1))
        return result


def finetune(cfg: FinetuneConfig, *, progress: bool = False) -> dict:
    """Fine-tune per ``cfg`` and return the result (also written to ``<out_dir>/result.json``):
    ``dice`` (student's mean test Dice over foreground classes), ``scores`` (per class, student and
    teacher), ``sizes`` (labelled / unlabelled / test samples), ``config``, ``train_seconds``."""
    return FineTuner(cfg).run(progress=progress)
