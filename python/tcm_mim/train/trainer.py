"""The pretraining loop shared by the four methods.

Per step: a deterministic batch (``SliceStream`` of 2-D crops, ``VolumeStream`` of 3-D
crops when the config's ``spatial_dims`` is 3, read from a prepared corpus by a DataLoader
with ``num_workers`` processes), the method's patch scores and
mask (``tcm_kernels.sample_mask`` with ``offset`` = a function of the step), the
SparK model, the method's loss, AdamW with warm-up + cosine. Checkpoints (``checkpoint.py``:
atomic, digest-checked, ``weights_only``) hold everything a resumed run needs to continue exactly;
a lock keeps a second run out of ``out_dir``.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import pathlib
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import tcm_kernels

from ..data import EMBEDDED, PreparedCorpus, embedded_corpus, prepare_corpus
from ..data.prepare import ensure_saliency
from ..errors import RunWarning
from ..models import SparKMIM, build_encoder, set_backend
from . import checkpoint
from .amlp import attention_recon_loss, category_consistency_loss, ccl_targets
from .config import ConfigError, PretrainConfig, resume_changes
from .loader import build_loader
from .stream import SliceStream, VolumeStream

# Every method logs every loss column (zero where a term does not apply), so runs line up.
LOSS_TERMS = ("loss", "recon", "contrastive", "ccl")
CSV_FIELDS = ("step", *LOSS_TERMS, "lr", "mask_ratio", "images_per_s")


def _corpus(cfg: PretrainConfig, dim: int, out: pathlib.Path, rank: int) -> PreparedCorpus:
    """The dataset as a prepared corpus, read crop by crop through memory maps.

    An embedded name is prepared into the data cache on first use; a prepared corpus (a folder
    with a manifest, from ``tcm-prepare``) is used as it is; a raw folder is prepared into
    ``<out_dir>/corpus`` first (resumable: a later run with the same out_dir reuses it). Under DDP,
    rank 0 prepares and the other ranks wait for it.
    """
    def prepare() -> PreparedCorpus:
        if cfg.dataset in EMBEDDED:
            return embedded_corpus(cfg.dataset, fallback=out / "corpus")
        if PreparedCorpus.is_corpus(cfg.dataset):
            return PreparedCorpus(cfg.dataset)
        if pathlib.Path(cfg.dataset).is_dir():
            report = prepare_corpus(cfg.dataset, out / "corpus", label_dir=cfg.label_dir,
                                    label_names=cfg.label_names, workers=max(cfg.num_workers, 1), progress=False)
            if report.failures or not report.rows:
                print(report.summary(), file=sys.stderr)
            return PreparedCorpus(out / "corpus")
        raise ConfigError(f"config: dataset must be one of {EMBEDDED}, a prepared corpus or an existing folder, "
                          f"got {cfg.dataset!r}")

    distributed = dist.is_available() and dist.is_initialized()
    corpus = prepare() if rank == 0 else None
    if distributed:
        dist.barrier()
        corpus = corpus or prepare()  # rank 0 has prepared it: the others only read the manifest
    flat = [row["source"] for row in corpus.rows if len(row["shape"]) != 3]
    if dim == 3 and flat:
        raise ConfigError(f"config: 3-D pretraining (dim 3, encoder {cfg.encoder!r}) needs volumes, but dataset "
                          f"{cfg.dataset!r} has 2-D images {flat}; use a 3-D dataset (brain_mri, chest_ct) or a "
                          f"2-D encoder (resnet_tiny)")
    if cfg.method == "tcm":
        corpus = corpus.select([i for i, row in enumerate(corpus.rows) if row["labels"] is not None])
        if not corpus.rows:
            raise ConfigError(f"config: method tcm needs scans with label maps for its prompts; dataset "
                              f"{cfg.dataset!r} has none (set label_dir for a folder dataset)")
    return corpus


class Trainer:
    """Builds model, data and optimiser from a :class:`PretrainConfig`; ``train()`` runs it."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.out_dir)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.dim = cfg.spatial_dims
        corpus = _corpus(cfg, self.dim, self.out, self.rank)
        self.model = SparKMIM(build_encoder(cfg.encoder, dim=self.dim, in_channels=1), dim=self.dim, in_channels=1,
                              decoder_width=cfg.decoder_width)
        set_backend(self.model, cfg.backend)
        if self.world > 1:  # statistics of the sparse batch norms over all ranks' active sites
            for m in self.model.modules():
                if hasattr(m, "sync"):
                    m.sync = True
        self.grid = (cfg.image_size // self.model.patch_size,) * self.dim
        saliency = self._stored_saliency(corpus) if cfg.method == "tcm" else None
        stream = VolumeStream if self.dim == 3 else SliceStream
        self.stream = stream(corpus, cfg.image_size, saliency=saliency, prompts=cfg.prompts, seed=cfg.seed)
        self.data_wait_s = 0.0  # time train() spent waiting for batches (the loader's share of the steps)
        width = self.model.encoder.channels[-1]
        self.head = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))
        self.ccl_head = nn.Linear(width, 1)  # amlp: the lesion logit of each patch's encoder features
        self.teacher = None
        if cfg.method == "anatomask":
            self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        extra = {"tcm": self.head, "amlp": self.ccl_head}.get(cfg.method)
        params = list(self.model.parameters()) + (list(extra.parameters()) if extra is not None else [])
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        # DDP averages the gradients of the ranks; the unwrapped model serves no-grad passes and checkpoints.
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.head_net = nn.parallel.DistributedDataParallel(self.head) if self.world > 1 and cfg.method == "tcm" \
            else self.head
        self.ccl_net = nn.parallel.DistributedDataParallel(self.ccl_head) \
            if self.world > 1 and cfg.method == "amlp" else self.ccl_head

    # ------------------------------------------------------------------ pieces

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        t = (step - self.cfg.warmup_steps) / max(self.cfg.steps - self.cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def _stored_saliency(self, corpus: PreparedCorpus) -> str:
        """Store the prompts' saliency beside the corpus's scans where it is missing; the localizer's key."""
        from ..localize import LabelTextLocalizer

        localizer = LabelTextLocalizer()
        if self.rank == 0:
            ensure_saliency(corpus.root, self.cfg.prompts, localizer)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        fresh = PreparedCorpus(corpus.root)  # the rows now list the stored saliency
        by_id = {row["id"]: row for row in fresh.rows}
        corpus.rows[:] = [by_id[row["id"]] for row in corpus.rows]
        return localizer.cache_key

    def _mask(self, scores: torch.Tensor, strategy: str, ratio: float, offset: int, **kw) -> torch.Tensor:
        return tcm_kernels.sample_mask(scores, ratio, strategy=strategy, seed=self.cfg.seed, offset=offset,
                                       **kw).visible

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def _per_patch_difficulty(self, model: nn.Module, images: torch.Tensor, step: int, *,
                              complementary: bool = False) -> torch.Tensor:
        """Per-patch loss of ``model`` on a uniform mask: the score AnatoMask and AMLP select by.

        ``complementary``: also run the complementary mask, so that every patch's value is its
        loss when masked (one no-grad pass over twice the batch); else the patches the probe
        kept score their (small) loss when visible.
        """
        b = images.shape[0]
        probe = self._mask(torch.zeros(b, self.num_patches), "uniform", 0.5, 2 * step + 1)
        with torch.no_grad():
            if not complementary:
                return model(images, probe).per_patch.float().clamp_min(0)
            both = model(torch.cat([images, images]), torch.cat([probe, ~probe])).per_patch.float().clamp_min(0)
            return torch.where(probe, both[b:], both[:b])

    def compute_loss(self, step: int,
                     batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The method's losses at ``step``, on ``batch`` (images, saliency) from the loader or else the stream's."""
        cfg = self.cfg
        images, saliency = batch if batch is not None else self.stream.batch(step * self.world + self.rank,
                                                                             cfg.batch_size)
        b, n = images.shape[0], self.num_patches
        ratio = cfg.ratio_at(step)
        zero = torch.zeros((), dtype=torch.float32)
        if cfg.method == "spark":
            out = self.net(images, self._mask(torch.zeros(b, n), "uniform", ratio, 2 * step))
            return {"loss": out.loss, "recon": out.loss, "contrastive": zero, "ccl": zero}
        if cfg.method == "tcm":
            scores = tcm_kernels.patch_scores(saliency, self.model.patch_size, reduce="mean")
            kw = dict(roi_threshold=cfg.roi_threshold, roi_mask_ratio=cfg.roi_mask_ratio)
            # both views in one forward: one DDP pass, and the norms see both
            views = torch.cat([self._mask(scores, "stratified", ratio, 2 * step + v, **kw) for v in (0, 1)])
            out = self.net(torch.cat([images, images]), views)
            z = self.head_net(out.embedding)
            contrastive = tcm_kernels.info_nce(z[:b], z[b:], temperature=cfg.temperature, normalize=True,
                                               gather=self.world > 1)
            recon = out.loss  # the mean over both views' masked patches (each row masks the same count)
            return {"loss": recon + cfg.contrastive_weight * contrastive, "recon": recon, "contrastive": contrastive,
                    "ccl": zero}
        if cfg.method == "anatomask":
            scores = self._per_patch_difficulty(self.teacher, images, step)
            visible = self._mask(scores, "hardest", ratio, 2 * step, hard_fraction=cfg.hard_fraction_at(step))
            out = self.net(images, visible)
            return {"loss": out.loss, "recon": out.loss, "contrastive": zero, "ccl": zero}
        # amlp: cluster- and difficulty-guided sampling, attention-weighted reconstruction, category
        # consistency, ratio ramp (definitions in tcm_mim.train.amlp)
        scores, lesion, difficulty = self._cluster_categories(images, step)
        visible = self._mask(scores, "weighted", ratio, 2 * step)
        out = self.net(images, visible)
        recon = attention_recon_loss(out.per_patch, visible)
        logits = self.ccl_net(out.patch_features.transpose(1, 2)).squeeze(-1)
        ccl = category_consistency_loss(logits, ccl_targets(lesion, difficulty, cfg.amlp_ccl_blend), visible)
        return {"loss": recon + cfg.amlp_ccl_weight * ccl, "recon": recon, "contrastive": zero, "ccl": ccl}

    def _cluster_categories(self, images: torch.Tensor, step: int):
        """AMLP: k-means of patch descriptors into lesion/background, with each patch's difficulty.

        Returns (scores float [B, N] > 0 for the weighted sampler: cluster membership blended with
        difficulty, lesion bool [B, N], difficulty float [B, N]: each patch's loss when masked).
        """
        from ..localize import ClusterGuide

        difficulty = self._per_patch_difficulty(self.model, images, step, complementary=True)
        scores, lesion = [], []
        for i in range(images.shape[0]):
            guide = ClusterGuide(self.model.patch_size, patch_loss=lambda _img, row=difficulty[i]: row,
                                 seed=self.cfg.seed)
            in_lesion, scaled = guide.categorize(images[i, 0])
            lesion.append(in_lesion)
            scores.append(guide.cluster_weight * in_lesion.float() + (1 - guide.cluster_weight) * scaled)
        return torch.stack(scores) + 1e-6, torch.stack(lesion), difficulty  # + 1e-6: every patch stays eligible

    # ------------------------------------------------------------------ state

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.out / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "head": self.head.state_dict(),
                "ccl_head": self.ccl_head.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "config": self.cfg.to_dict(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        if "ccl_head" in state:  # checkpoints written before the CCL head existed have none
            self.ccl_head.load_state_dict(state["ccl_head"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimiser's hyperparameters follow this config, not the checkpoint's: equal when resuming
        # an unchanged run, and what an explicitly changed lr / weight_decay / schedule must become.
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay
            group["lr"] = self.cfg.lr * self._lr_factor(self.scheduler.last_epoch)
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> pathlib.Path:
        """Write ``checkpoint.pt`` (rank 0) with its digest; refused, keeping the last one, if a tensor is
        not finite (:class:`~tcm_mim.train.checkpoint.CheckpointError`)."""
        if self.rank == 0:
            checkpoint.save(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

    def _resume(self, apply_changes: bool) -> None:
        """Load ``checkpoint.pt`` if there is one; refuse a config that changes the run unless ``apply_changes``."""
        path = self.checkpoint_path
        if not path.exists():
            warnings.warn(f"--resume: no checkpoint at {path}; starting a fresh run", RunWarning, stacklevel=3)
            return
        state = checkpoint.load(path, required=("model", "optimizer", "scheduler", "step", "config"))
        changes, fixed = resume_changes(state["config"], self.cfg, source=str(path))
        if fixed:
            raise ConfigError(f"--resume: {path} was trained with {', '.join(fixed)}; these keys cannot change "
                              f"on resume (use another out_dir for a new run)")
        if changes and not apply_changes:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise ConfigError(f"--resume: the config differs from {path}'s in keys that change the run: {listed}; "
                              f"pass --apply-config-changes to continue with the new values, or set them back")
        if self.cfg.steps < int(state["step"]):
            raise ConfigError(f"--resume: steps {self.cfg.steps} is below the step {state['step']} of {path}")
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as err:  # missing entries, shapes or parameter groups
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this run: {type(err).__name__}: "
                                             f"{' '.join(str(err).split())[:400]}") from None

    # ------------------------------------------------------------------ loop

    def _log_rows(self, resume_step: int):
        path = self.out / "log.csv"
        rows = []
        if path.exists() and resume_step > 0:  # keep the rows before the resume point, drop the rest
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        f = path.open("w", newline="")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        return f, writer

    def train(self, *, resume: bool = False, apply_changes: bool = False, stop_after: int | None = None,
              progress: bool = True) -> pathlib.Path:
        """Run to ``cfg.steps`` (or ``stop_after`` steps, for tests); returns the checkpoint path.

        ``resume``: continue from ``<out_dir>/checkpoint.pt`` if it exists (else start fresh, with a
        warning); a config that differs from the checkpoint's in a key that changes the run raises
        :class:`ConfigError` listing each such key, unless ``apply_changes``. Raises
        :class:`~tcm_mim.train.checkpoint.RunLockedError` while another run holds ``out_dir``.
        """
        lead = self.rank == 0  # one process writes logs, images and checkpoints
        lock = checkpoint.RunLock(self.out).acquire() if lead else None
        try:
            if lead:
                checkpoint.remove_orphan_temps(self.out)
            if resume:
                self._resume(apply_changes)
            self._run(lead, stop_after, progress)
        finally:
            if lock is not None:
                lock.release()
        return self.checkpoint_path

    def _run(self, lead: bool, stop_after: int | None, progress: bool) -> None:
        cfg = self.cfg
        f, writer = self._log_rows(self.step) if lead else (None, None)
        tb = _tensorboard(self.out / "tb") if lead else None
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = _progress(total=cfg.steps, initial=self.step, enabled=progress and lead)
        self.model.train()
        # Only the iterator is kept: deleting it below stops the (persistent) worker processes.
        batches = iter(build_loader(self.stream, cfg.batch_size, self.step, end, rank=self.rank, world=self.world,
                                    num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor))
        try:
            while self.step < end:
                t0 = time.perf_counter()
                batch = next(batches)
                self.data_wait_s += time.perf_counter() - t0
                losses = self.compute_loss(self.step, batch)
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                self.optimizer.step()
                self.scheduler.step()
                if self.teacher is not None:
                    _ema_update(self.teacher, self.model, cfg.ema)
                rate = cfg.batch_size / (time.perf_counter() - t0)
                row = {"step": self.step, **{k: f"{float(v.detach()):.6g}" for k, v in losses.items()},
                       "lr": f"{self.scheduler.get_last_lr()[0]:.6g}", "mask_ratio": f"{cfg.ratio_at(self.step):.4g}",
                       "images_per_s": f"{rate:.3g}"}
                if writer is not None:
                    writer.writerow(row)
                if tb is not None:
                    for k, v in losses.items():
                        tb.add_scalar(f"train/{k}", float(v.detach()), self.step)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=row["loss"], img_s=row["images_per_s"])
                if f is not None and self.step % cfg.log_every == 0:
                    f.flush()
                if lead and cfg.image_every and self.step % cfg.image_every == 0:
                    self.save_images(self.out / f"step{self.step:06d}.png")
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    if f is not None:  # the log holds every row up to the checkpoint, whatever log_every
                        f.flush()
                        os.fsync(f.fileno())
                    self.save_checkpoint()
        finally:
            del batches
            if f is not None:
                f.close()
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()

    def save_images(self, path: pathlib.Path) -> None:
        """image | masked input | reconstruction (de-normalised with each patch's own statistics), per row.

        3-D: the central axial slice (first axis) of each of the three volumes.
        """
        from PIL import Image

        images, saliency = self.stream.batch(0, min(4, self.cfg.batch_size))
        b = images.shape[0]
        scores = tcm_kernels.patch_scores(saliency, self.model.patch_size, reduce="mean")
        visible = self._mask(scores, "stratified" if self.cfg.method == "tcm" else "uniform", self.cfg.ratio_at(0),
                             0, roi_threshold=self.cfg.roi_threshold, roi_mask_ratio=self.cfg.roi_mask_ratio)
        self.model.eval()
        with torch.no_grad():
            pred = self.model(images, visible).pred
        self.model.train()
        p = self.model.patch_size
        pix = tcm_kernels.upsample_mask(visible.reshape(b, 1, *self.grid), p).float()
        rec = _denormalize_patches(pred, images, p) if self.model.norm_pix else pred
        rec = rec * (1 - pix) + images * pix
        panels = [images, images * pix, rec.clamp(0, 1)]
        if self.dim == 3:
            panels = [x[:, :, x.shape[2] // 2] for x in panels]
        rows = torch.cat(panels, dim=3)[:, 0]
        grid = torch.cat(list(rows), dim=0)
        Image.fromarray((grid.numpy() * 255).astype("uint8")).save(path)


def _denormalize_patches(pred: torch.Tensor, target: torch.Tensor, p: int) -> torch.Tensor:
    """Undo norm_pix on pred [B, C, *S] (2-D or 3-D) with each target patch's mean and std."""
    b, c, *spatial = target.shape
    t = target.reshape(b, c, *[x for s in spatial for x in (s // p, p)])
    within = tuple(range(3, 2 + 2 * len(spatial), 2))  # the axes inside a patch
    mean = t.mean(dim=within, keepdim=True)
    std = (t.var(dim=within, keepdim=True) + 1e-6).sqrt()
    return (pred.reshape_as(t) * std + mean).reshape(target.shape)


def _ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)


def _tensorboard(path: pathlib.Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the train extra; without it only the CSV is written
        return None
    return SummaryWriter(str(path))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
