"""The pretraining loop shared by the four methods.

Per step: a deterministic batch (``SliceStream`` of 2-D crops, ``VolumeStream`` of 3-D
crops when the config's ``spatial_dims`` is 3), the method's patch scores and
mask (``tcm_kernels.sample_mask`` with ``offset`` = a function of the step), the
SparK model, the method's loss, AdamW with warm-up + cosine. Checkpoints are written
atomically and hold everything a resumed run needs to continue exactly.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import pathlib
import time

import torch
import torch.distributed as dist
from torch import nn

import tcm_kernels

from ..data import EMBEDDED, FolderDataset, load_embedded
from ..models import SparKMIM, build_encoder, set_backend
from .amlp import attention_recon_loss, category_consistency_loss, ccl_targets
from .config import PretrainConfig
from .stream import SliceStream, VolumeStream

# Every method logs every loss column (zero where a term does not apply), so runs line up.
LOSS_TERMS = ("loss", "recon", "contrastive", "ccl")
CSV_FIELDS = ("step", *LOSS_TERMS, "lr", "mask_ratio", "images_per_s")


def atomic_save(obj, path: pathlib.Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _scans(cfg: PretrainConfig, dim: int):
    """The dataset's scans: an embedded name, or a folder read by :class:`tcm_mim.data.FolderDataset`."""
    if cfg.dataset in EMBEDDED:
        scans = load_embedded(cfg.dataset)
    elif pathlib.Path(cfg.dataset).is_dir():
        scans = FolderDataset(cfg.dataset, label_dir=cfg.label_dir, label_names=cfg.label_names,
                              mode="3d" if dim == 3 else "2d").scans
    else:
        raise ValueError(f"config: dataset must be one of {EMBEDDED} or an existing folder, got {cfg.dataset!r}")
    flat = [s.name for s in scans if s.image.ndim != 3]
    if dim == 3 and flat:
        raise ValueError(f"config: 3-D pretraining (dim 3, encoder {cfg.encoder!r}) needs volumes, but dataset "
                         f"{cfg.dataset!r} has 2-D images {flat}; use a 3-D dataset (brain_mri, chest_ct) or a "
                         f"2-D encoder (resnet_tiny)")
    if cfg.method == "tcm" and cfg.localizer == "label":
        scans = [s for s in scans if s.labels is not None]
        if not scans:
            raise ValueError(f"tcm with localizer=label needs scans with label maps for its prompts; {cfg.dataset} "
                             f"has none: use localizer=atlas (atlas=brain_mri|chest_ct) for unlabelled scans")
    if cfg.method == "tcm" and cfg.localizer == "atlas":
        scans = [s for s in scans if s.image.ndim == 3]  # an embedded chest_xray's radiographs have no 3-D atlas
        if not scans:
            raise ValueError(f"tcm with localizer=atlas needs 3-D volumes; {cfg.dataset} has none")
    return scans


class Trainer:
    """Builds model, data and optimiser from a :class:`PretrainConfig`; ``train()`` runs it."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.out_dir)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.dim = cfg.spatial_dims
        scans = _scans(cfg, self.dim)
        self.model = SparKMIM(build_encoder(cfg.encoder, dim=self.dim, in_channels=1), dim=self.dim, in_channels=1,
                              decoder_width=cfg.decoder_width)
        set_backend(self.model, cfg.backend)
        if self.world > 1:  # statistics of the sparse batch norms over all ranks' active sites
            for m in self.model.modules():
                if hasattr(m, "sync"):
                    m.sync = True
        if cfg.image_size % self.model.patch_size:
            raise ValueError(f"config: image_size {cfg.image_size} must be a multiple of the encoder's patch size "
                             f"{self.model.patch_size}")
        self.grid = (cfg.image_size // self.model.patch_size,) * self.dim
        saliency = self._saliency_provider(scans) if cfg.method == "tcm" else None
        stream = VolumeStream if self.dim == 3 else SliceStream
        self.stream = stream(scans, cfg.image_size, saliency=saliency, prompts=cfg.prompts, seed=cfg.seed)
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

    def _saliency_provider(self, scans):
        from ..localize import AtlasLocalizer, CLIPSegLocalizer, LabelTextLocalizer, SaliencyCache

        cfg, cache = self.cfg, SaliencyCache(self.out / "saliency_cache")
        if cfg.localizer == "atlas":
            # Registered once per scan, up front (warped labels cached by content under out_dir), with a QC PNG
            # per scan so that a failed registration is seen before training on it.
            localizer = AtlasLocalizer(cfg.atlas or cfg.dataset, cache_dir=self.out / "atlas_cache")
            if self.rank == 0:
                write_atlas_qc(localizer, scans, self.out / "atlas_qc", cfg.prompts)
        elif cfg.localizer == "clipseg":
            localizer = CLIPSegLocalizer(cfg.clipseg_checkpoint)
        else:
            localizer = LabelTextLocalizer()

        def provide(index: int, prompt: str) -> torch.Tensor:
            scan = scans[index]
            if cfg.localizer == "atlas":  # the atlas localizer takes the Scan: it needs the spacing and modality
                return cache.get(scan.name, prompt, localizer, scan)
            return cache.get(scan.name, prompt, localizer, scan.image, labels=scan.labels)

        return provide

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

    def compute_loss(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, saliency = self.stream.batch(step * self.world + self.rank, cfg.batch_size)
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
                "step": self.step, "config": dataclasses.asdict(self.cfg), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        if "ccl_head" in state:  # checkpoints written before the CCL head existed have none
            self.ccl_head.load_state_dict(state["ccl_head"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint(self) -> pathlib.Path:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

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

    def train(self, *, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> pathlib.Path:
        """Run to ``cfg.steps`` (or ``stop_after`` steps, for tests); returns the checkpoint path."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self.load_state_dict(torch.load(self.checkpoint_path, weights_only=False))
        lead = self.rank == 0  # one process writes logs, images and checkpoints
        f, writer = self._log_rows(self.step) if lead else (None, None)
        tb = _tensorboard(self.out / "tb") if lead else None
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = _progress(total=cfg.steps, initial=self.step, enabled=progress and lead)
        self.model.train()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                losses = self.compute_loss(self.step)
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
                    self.save_checkpoint()
        finally:
            if f is not None:
                f.close()
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
        return self.checkpoint_path

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


def write_atlas_qc(localizer, scans, folder: pathlib.Path, prompts) -> list[pathlib.Path]:
    """Register the atlas to every scan and write ``folder/<scan>.png``: atlas contours on the scan."""
    from ..data import normalize_intensity
    from ..viz import render_atlas_qc, save_png

    ids = sorted({m.label_id for p in prompts for m in localizer.match(p)})
    paths = []
    for i, scan in enumerate(scans):
        reg = localizer.register(scan)
        path = folder / f"{i:04d}_{pathlib.Path(scan.name).name.split('.')[0] or 'scan'}.png"
        title = (f"{scan.name}: atlas {localizer.atlas.name} registered in {reg.seconds:.1f} s, foreground Dice "
                 f"{reg.foreground_dice:.3f}; red: {', '.join(prompts)}")
        save_png(render_atlas_qc(normalize_intensity(scan.image, scan.modality), reg.labels.array, scan.spacing,
                                 title, highlight=reg.labels.mask(ids)), path)
        paths.append(path)
    return paths


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
