"""AnatoMask: an EMA teacher's per-patch loss picks the hardest patches to mask (a curriculum)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Method, register


@register
class AnatoMask(Method):
    name = "anatomask"

    def __init__(self, trainer):
        super().__init__(trainer)
        self.teacher = copy.deepcopy(trainer.model).requires_grad_(False)

    def extra_state(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t, cfg = self.trainer, self.cfg
        scores = t.per_patch_difficulty(self.teacher, images, draw)
        visible = t.mask(scores, "hardest", cfg.ratio_at(step), 2 * draw, hard_fraction=cfg.hard_fraction_at(step))
        return self.recon_only(t.forward(images, visible).loss)

    def after_step(self) -> None:
        momentum = self.cfg.ema
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher.parameters(), self.trainer.model.parameters()):
                p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
            for b_t, b_s in zip(self.teacher.buffers(), self.trainer.model.buffers()):
                b_t.copy_(b_s)
