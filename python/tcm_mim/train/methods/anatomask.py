"""AnatoMask: an EMA teacher's per-patch loss picks the hardest patches to mask (a curriculum).

As the authors' trainer (docs/methods.md): the teacher, in eval mode, reconstructs under a uniform probe mask at
the training ratio; a patch scores the teacher's error where the probe masked it and 0 where the probe kept it
(:func:`~tcm_mim.train.teacher.masked_probe_scores`); the teacher follows the student by an EMA whose momentum
may ramp (``ema`` -> ``ema_end`` over the first quarter of the run).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..teacher import ema_update, masked_probe_scores
from .base import Method, register


@register
class AnatoMask(Method):
    name = "anatomask"

    def __init__(self, trainer):
        super().__init__(trainer)
        # eval mode: the probe normalises with running statistics and drops no path
        self.teacher = copy.deepcopy(trainer.model).requires_grad_(False).eval()

    def extra_state(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def selection_scores(self, images: torch.Tensor, ratio: float, draw: int) -> torch.Tensor:
        """float32 [B, N]: the teacher's per-patch error under a uniform probe masking ``ratio``, 0 where the
        probe left the patch visible (so a visible probe patch never outranks a masked one)."""
        t = self.trainer
        probe = t.mask(torch.zeros(images.shape[0], t.num_patches, device=images.device), "uniform", ratio,
                       2 * draw + 1)
        with torch.no_grad():
            per_patch = self.teacher(images, probe).per_patch
        return masked_probe_scores(per_patch, probe)

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t, cfg = self.trainer, self.cfg
        ratio = cfg.ratio_at(step)
        scores = self.selection_scores(images, ratio, draw)
        visible = t.mask(scores, "hardest", ratio, 2 * draw, hard_fraction=cfg.hard_fraction_at(step))
        return self.recon_only(t.forward(images, visible).loss)

    def after_step(self) -> None:
        ema_update(self.teacher, self.trainer.model, self.cfg.ema_at(self.trainer.step))
