"""SparK: a uniform random mask and the masked reconstruction loss."""

from __future__ import annotations

import torch

from .base import Method, register


@register
class SparK(Method):
    name = "spark"

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t = self.trainer
        scores = torch.zeros(images.shape[0], t.num_patches, device=t.device)
        out = t.forward(images, t.mask(scores, "uniform", self.cfg.ratio_at(step), 2 * draw))
        return self.recon_only(out.loss)
