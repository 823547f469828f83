"""The pretraining loop shared by every method (:mod:`tcm_mim.train.methods`).

Per optimiser step, ``grad_accum_steps`` micro-batches: a deterministic batch
(``SliceStream`` of 2-D crops, ``VolumeStream`` of 3-D crops when the config's
``spatial_dims`` is 3, read from a prepared corpus by a DataLoader with ``num_workers``
processes) copied to the run's device, the method's masks and loss under
autocast (``precision``) through the optionally compiled model (``compile``), backward
(loss-scaled for fp16); then the gradient norm (clipped to ``max_grad_norm``), the
non-finite guard, AdamW with warm-up + cosine. Checkpoints (``checkpoint.py``: atomic,
digest-checked, ``weights_only``, never with non-finite weights) hold everything a resumed run
needs to continue exactly; a lock keeps a second run out of ``out_dir``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
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
from ..data.split import SPLIT_FILE, SplitManifest, embedded_split, split_by_scan
from ..errors import RunWarning, UserError
from ..models import SparKMIM, build_encoder, param_groups, set_backend, sync_decoder_norms
from . import checkpoint
from .config import ConfigError, PretrainConfig, resume_changes
from .device import resolve_device, resolve_precision
from .loader import build_loader
from .methods import Method, method_class
from .stream import SliceStream, VolumeStream
from .teacher import eval_mode

log = logging.getLogger("tcm_mim.train")

# Every method logs every loss column (zero where a term does not apply), so runs line up.
LOSS_TERMS = ("loss", "recon", "contrastive", "ccl")
# Realised shares of masked patches (overall, ROI, background) of the methods that report them (tcm); empty else.
MASK_SHARES = ("masked", "roi_masked", "bg_masked")
CSV_FIELDS = ("step", *LOSS_TERMS, "grad_norm", "lr", "mask_ratio", *MASK_SHARES, "images_per_s")


class NonFiniteError(UserError):
    """A loss term or the gradient became NaN/inf and ``skip_nonfinite`` allows no more skips: a
    problem of the data or the settings (one line and exit 2 from the CLI), not of the code."""


def _corpus(cfg: PretrainConfig, dim: int, out: pathlib.Path, rank: int) -> tuple[PreparedCorpus, SplitManifest]:
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
    split = split_manifest(cfg, corpus)
    # held-out scans are dropped here; the streams refuse any read of them or of held-out blocks
    corpus = corpus.select([i for i, row in enumerate(corpus.rows) if row["source"] not in split.test])
    # needs_labels: the prompts are matched to the scans' own label maps, unless an atlas or CLIPSeg places them.
    if method_class(cfg.method).needs_labels and cfg.localizer == "label":
        corpus = corpus.select([i for i, row in enumerate(corpus.rows) if row["labels"] is not None])
        if not corpus.rows:
            raise ConfigError(f"config: method {cfg.method} with localizer=label needs scans with label maps for its "
                              f"prompts; dataset {cfg.dataset!r} has none (set label_dir for a folder dataset, or "
                              f"use localizer=atlas atlas=brain_mri|chest_ct for unlabelled volumes)")
    if method_class(cfg.method).needs_saliency and cfg.localizer == "atlas":
        corpus = corpus.select([i for i, row in enumerate(corpus.rows) if len(row["shape"]) == 3])
        if not corpus.rows:
            raise ConfigError(f"config: localizer=atlas registers a 3-D atlas, but dataset {cfg.dataset!r} has no "
                              f"volumes")
    return corpus, split


def split_manifest(cfg: PretrainConfig, corpus: PreparedCorpus) -> SplitManifest:
    """The run's split manifest: the file ``cfg.split``, the embedded volume's axial-block split, or
    ``cfg.test_fraction`` of the scans held out (``cfg.split_seed``)."""
    if cfg.split is not None:
        if not pathlib.Path(cfg.split).is_file():
            raise ConfigError(f"config: split must be a split manifest file, got {cfg.split!r} (not a file)")
        return SplitManifest.load(cfg.split)
    if cfg.dataset in EMBEDDED:
        labelled = [i for i, row in enumerate(corpus.rows) if row["labels"] is not None]
        if not labelled:
            return SplitManifest("block")
        scan = corpus.scan(labelled[0])
        return embedded_split(cfg.dataset, corpus.rows[labelled[0]]["source"], scan.label_map, scan.label_names)
    if len(corpus.rows) < 2:
        raise ConfigError(f"config: dataset {cfg.dataset!r} has {len(corpus.rows)} scan(s); a split by scan needs "
                          f"at least 2 so that evaluation can test on a scan pretraining never read")
    return split_by_scan([row["source"] for row in corpus.rows], test_fraction=cfg.test_fraction,
                         seed=cfg.split_seed)


class Trainer:
    """Builds model, method, data and optimiser from a :class:`PretrainConfig`; ``train()`` runs it.

    ``compile_backend``: the ``torch.compile`` backend used when ``cfg.compile`` is true
    (tests pass ``"aot_eager"``, which skips inductor's code generation).
    """

    def __init__(self, cfg: PretrainConfig, *, compile_backend: str = "inductor"):
        self.cfg = cfg
        self.out = pathlib.Path(cfg.out_dir)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.dim = cfg.spatial_dims
        corpus, self.split = _corpus(cfg, self.dim, self.out, self.rank)
        if self.rank == 0:  # what pretraining held out and read, beside its checkpoint, for tcm-eval to check
            dataclasses.replace(self.split, pretrained_on=sorted(r["digest"] for r in corpus.rows)).save(
                self.out / SPLIT_FILE)
        self.model = SparKMIM(build_encoder(cfg.encoder, dim=self.dim, in_channels=1, drop_path=cfg.drop_path),
                              dim=self.dim, in_channels=1, decoder_width=cfg.decoder_width, decoder=cfg.decoder)
        set_backend(self.model, cfg.backend)
        if self.world > 1:  # statistics of the sparse batch norms over all ranks' active sites
            for m in self.model.modules():
                if hasattr(m, "sync"):
                    m.sync = True
            sync_decoder_norms(self.model, self.device)  # SparK's sbn (GPU devices: torch's SyncBatchNorm)
        self.model.to(self.device)
        self.grid = (cfg.image_size // self.model.patch_size,) * self.dim
        # DDP averages the gradients of the ranks; the unwrapped model serves no-grad passes and checkpoints.
        self.net = self.distribute(self.model)
        self.method: Method = method_class(cfg.method)(self)
        saliency = self._stored_saliency(corpus) if self.method.needs_saliency else None
        stream = VolumeStream if self.dim == 3 else SliceStream
        self.stream = stream(corpus, cfg.image_size, saliency=saliency, prompts=cfg.prompts, seed=cfg.seed,
                             split=self.split)
        self.data_wait_s = 0.0  # time train() spent waiting for batches (the loader's share of the steps)
        self.params = [*self.model.parameters(), *self.method.heads.parameters()]
        # SparK's groups: weight decay on weights, none on mask tokens, norms and biases (decayed group first).
        named = [*self.model.named_parameters(), *self.method.heads.named_parameters()]
        self.optimizer = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # fp16 needs a loss scale (its range ends at 65504); disabled, the scaler is the identity.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.skipped = 0  # non-finite steps skipped so far (skip_nonfinite)
        # The training forward; no-grad probes (teacher, difficulty) call the eager model.
        self.forward = torch.compile(self.net, backend=compile_backend) if cfg.compile else self.net

    # ------------------------------------------------------------------ pieces

    def distribute(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DDP when the run has several ranks (gradients averaged), else itself."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        t = (step - self.cfg.warmup_steps) / max(self.cfg.steps - self.cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def _stored_saliency(self, corpus: PreparedCorpus) -> str:
        """Store the prompts' saliency beside the corpus's scans where it is missing; the localizer's key."""
        from ..localize import AtlasLocalizer, CLIPSegLocalizer, LabelTextLocalizer

        cfg = self.cfg
        # Guidance from the evaluated scan's own labels (label maps, or an atlas that is that very subject)
        # must not select a class the evaluation scores (docs/evaluation.md).
        if cfg.localizer == "label" or (cfg.localizer == "atlas" and (cfg.atlas or cfg.dataset) == cfg.dataset):
            try:
                self.split.check_guidance(cfg.prompts, {row["source"]: corpus.scan(i).labels for i, row in
                                                        enumerate(corpus.rows) if row["source"] in self.split.blocks},
                                          LabelTextLocalizer())
            except ValueError as err:
                raise ConfigError(f"config: {err}") from None
        if cfg.localizer == "atlas":
            # Warped labels cached by content under out_dir; a QC PNG per scan shows a failed registration.
            localizer = AtlasLocalizer(cfg.atlas or cfg.dataset, cache_dir=self.out / "atlas_cache")
            if self.rank == 0:
                write_atlas_qc(localizer, corpus, self.out / "atlas_qc", cfg.prompts)
        elif cfg.localizer == "clipseg":
            localizer = CLIPSegLocalizer(cfg.clipseg_checkpoint)
        else:
            localizer = LabelTextLocalizer()
        if self.rank == 0:
            ensure_saliency(corpus.root, cfg.prompts, localizer, only={row["id"] for row in corpus.rows})
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        fresh = PreparedCorpus(corpus.root)  # the rows now list the stored saliency
        by_id = {row["id"]: row for row in fresh.rows}
        corpus.rows[:] = [by_id[row["id"]] for row in corpus.rows]
        return localizer.cache_key

    def mask(self, scores: torch.Tensor, strategy: str, ratio: float, offset: int, **kw) -> torch.Tensor:
        """visible bool [B, N] from ``tcm_kernels.sample_mask`` (Philox seed = the run's seed)."""
        return tcm_kernels.sample_mask(scores, ratio, strategy=strategy, seed=self.cfg.seed, offset=offset,
                                       **kw).visible

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def per_patch_difficulty(self, model: nn.Module, images: torch.Tensor, draw: int) -> torch.Tensor:
        """Each patch's loss when masked (AMLP's difficulty): a uniform 50 % probe and its complement in one
        no-grad pass over twice the batch, ``model`` in eval mode (:func:`~tcm_mim.train.teacher.eval_mode`:
        running statistics used, not moved, by the probe batch). float32 [B, N] on the images' device.
        """
        b = images.shape[0]
        probe = self.mask(torch.zeros(b, self.num_patches, device=images.device), "uniform", 0.5, 2 * draw + 1)
        with torch.no_grad(), eval_mode(model):
            both = model(torch.cat([images, images]), torch.cat([probe, ~probe])).per_patch.float().clamp_min(0)
        return torch.where(probe, both[b:], both[:b])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory: the copy runs asynchronously
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def batch(self, draw: int, batches=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``draw`` of this rank on the device: (images, saliency) [B, 1, *S] each.

        ``batches``: the run's loader iterator, whose next batch is micro-batch ``draw`` (the loader and
        the stream give the same items); without it the stream builds the batch here.
        """
        if batches is None:
            images, saliency = self.stream.batch(draw * self.world + self.rank, self.cfg.batch_size)
        else:
            t0 = time.perf_counter()
            images, saliency = next(batches)
            self.data_wait_s += time.perf_counter() - t0
        return self._to_device(images), self._to_device(saliency)

    def autocast(self):
        """The precision context of forward passes and losses (``precision``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def compute_loss(self, step: int, draw: int | None = None, batches=None) -> dict[str, torch.Tensor]:
        """The method's loss terms of micro-batch ``draw`` (default: ``step``) at optimiser step ``step``
        (the batch from ``batches``, the loader's iterator, if given)."""
        draw = step if draw is None else draw
        images, saliency = self.batch(draw, batches)
        with self.autocast():
            return self.method.loss(images, saliency, step, draw)

    # ------------------------------------------------------------------ state

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.out / "checkpoint.pt"

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), **self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "config": self.cfg.to_dict(),
                "method": self.cfg.method, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # checkpoints written before precision existed have none
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        # The optimiser's hyperparameters follow this config, not the checkpoint's: equal when resuming
        # an unchanged run, and what an explicitly changed lr / weight_decay / schedule must become.
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * self._lr_factor(self.scheduler.last_epoch)
        self.optimizer.param_groups[0]["weight_decay"] = self.cfg.weight_decay  # the exempt group keeps 0

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

    def _no_sync(self) -> contextlib.ExitStack:
        """Skip DDP's gradient all-reduce (micro-batches before the last of an accumulation)."""
        stack = contextlib.ExitStack()
        for net in (self.net, *self.method.head_nets.values()):
            if isinstance(net, nn.parallel.DistributedDataParallel):
                stack.enter_context(net.no_sync())
        return stack

    def train_step(self, batches=None) -> dict[str, float]:
        """One optimiser step at ``self.step``: its loss terms (mean over the micro-batches) and gradient norm.

        ``batches``: the loader's iterator over micro-batches (:meth:`train`); default: the stream.

        Host synchronisation: one copy of the loss terms and the gradient norm to the host, after
        backward and before the update (the non-finite guard needs them, and so does the log).
        Raises :class:`NonFiniteError` on a NaN/inf loss term or gradient beyond ``skip_nonfinite``.
        """
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for k in range(accum):
            with self._no_sync() if k < accum - 1 else contextlib.nullcontext():
                losses = self.compute_loss(self.step, self.step * accum + k, batches)
                self.scaler.scale(losses["loss"] / accum).backward()
            logged = (*LOSS_TERMS, *(m for m in MASK_SHARES if m in losses))
            terms = torch.stack([losses[t].detach().float() for t in logged])
            total = terms if total is None else total + terms
        self.scaler.unscale_(self.optimizer)  # true gradients for the norm and the clipping (fp16)
        grads = [p.grad for p in self.params if p.grad is not None]
        if cfg.max_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            norm = nn.utils.get_total_norm(grads)
        stats = torch.cat([total / accum, norm.float().reshape(1).to(total.device)]).tolist()
        values = dict(zip((*logged, "grad_norm"), stats))
        bad = [t for t in LOSS_TERMS[1:] if not math.isfinite(values[t])]
        if not math.isfinite(values["loss"]) and not bad:
            bad = ["loss"]
        # fp16: an inf gradient is the loss scale overflowing; the scaler skips that update and lowers the scale.
        bad_grad = not math.isfinite(values["grad_norm"]) and not self.scaler.is_enabled()
        if bad or bad_grad:
            self._nonfinite(values, bad)
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step()
        self.scheduler.step()
        return values

    def _nonfinite(self, values: dict[str, float], bad: list[str]) -> None:
        what = (f"non-finite loss term {', '.join(f'{t}={values[t]}' for t in bad)}" if bad
                else f"non-finite gradient (norm {values['grad_norm']}) with finite loss terms")
        self.skipped += 1
        if self.skipped > self.cfg.skip_nonfinite:
            kept = (f"the last checkpoint {self.checkpoint_path} is kept" if self.checkpoint_path.exists()
                    else "no checkpoint was written")
            raise NonFiniteError(f"step {self.step}: {what}; the update was not applied and {kept}. Check the data "
                                 f"(NaN/inf voxels), lr and precision, or allow skipping with skip_nonfinite: N "
                                 f"(skipped so far: {self.skipped - 1})")
        log.warning("step %d: %s; step skipped (%d of skip_nonfinite=%d)", self.step, what, self.skipped,
                    self.cfg.skip_nonfinite)

    def train(self, *, resume: bool = False, apply_changes: bool = False, stop_after: int | None = None,
              progress: bool = True) -> pathlib.Path:
        """Run to ``cfg.steps`` (or ``stop_after`` steps, for tests); returns the checkpoint path.

        ``resume``: continue from ``<out_dir>/checkpoint.pt`` if it exists (else start fresh, with a
        warning); a config that differs from the checkpoint's in a key that changes the run raises
        :class:`ConfigError` listing each such key, unless ``apply_changes``. Raises
        :class:`~tcm_mim.train.checkpoint.RunLockedError` while another run holds ``out_dir``, and
        :class:`NonFiniteError` on a NaN/inf loss or gradient beyond ``skip_nonfinite``.
        """
        self.out.mkdir(parents=True, exist_ok=True)
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
        accum = cfg.grad_accum_steps
        # The loader numbers micro-batches (step * grad_accum_steps + k). Only the iterator is kept:
        # deleting it below stops the (persistent) worker processes.
        batches = iter(build_loader(self.stream, cfg.batch_size, self.step * accum, end * accum, rank=self.rank,
                                    world=self.world, num_workers=cfg.num_workers,
                                    prefetch_factor=cfg.prefetch_factor, pin_memory=self.device.type == "cuda"))
        try:
            while self.step < end:
                t0 = time.perf_counter()
                values = self.train_step(batches)
                rate = cfg.batch_size * cfg.grad_accum_steps / (time.perf_counter() - t0)
                row = {"step": self.step, **{k: f"{v:.6g}" for k, v in values.items()},
                       "lr": f"{self.scheduler.get_last_lr()[0]:.6g}", "mask_ratio": f"{cfg.ratio_at(self.step):.4g}",
                       "images_per_s": f"{rate:.3g}"}
                if writer is not None:
                    writer.writerow(row)
                if tb is not None:
                    for k, v in values.items():
                        tb.add_scalar(f"train/{k}", v, self.step)
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

        images, saliency = (self._to_device(t) for t in self.stream.batch(0, min(4, self.cfg.batch_size)))
        b = images.shape[0]
        scores = tcm_kernels.patch_scores(saliency, self.model.patch_size, reduce="mean")
        visible = self.mask(scores, self.method.preview_strategy, self.cfg.ratio_at(0), 0,
                            roi_threshold=self.cfg.roi_threshold, roi_mask_ratio=self.cfg.roi_mask_ratio)
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
        Image.fromarray((grid.cpu().numpy() * 255).astype("uint8")).save(path)


def write_atlas_qc(localizer, corpus: PreparedCorpus, folder: pathlib.Path, prompts) -> list[pathlib.Path]:
    """Register the atlas to every scan of ``corpus``; write ``folder/<id>.png``: the atlas contours on the scan."""
    import numpy as np

    from ..data.prepare import decode_image
    from ..data.scan import Scan
    from ..viz import render_atlas_qc, save_png

    ids = sorted({m.label_id for p in prompts for m in localizer.match(p)})
    paths = []
    for row in corpus.rows:
        image = decode_image(np.load(corpus.root / row["image"]))
        reg = localizer.register(Scan(row["source"], row["modality"], image, tuple(row["spacing"])))
        title = (f"{row['source']}: atlas {localizer.atlas.name} registered in {reg.seconds:.1f} s, foreground "
                 f"Dice {reg.foreground_dice:.3f}; red: {', '.join(prompts)}")
        path = folder / f"{row['id']}.png"
        save_png(render_atlas_qc(image, reg.labels.array, tuple(row["spacing"]), title,
                                 highlight=reg.labels.mask(ids)), path)
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
