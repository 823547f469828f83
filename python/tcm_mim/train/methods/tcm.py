"""TCM: text-guided stratified masking of two views, reconstruction plus InfoNCE between the views."""

from __future__ import annotations

import torch
from torch import nn

import tcm_kernels

from .base import Method, register


@register
class TCM(Method):
    name = "tcm"
    needs_labels = True
    needs_saliency = True
    preview_strategy = "stratified"
    default_mask_ratio = 0.4

    def build_heads(self, width: int) -> dict[str, nn.Module]:
        # "head": the projection of the pooled deepest features that InfoNCE compares
        return {"head": nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))}

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t, cfg = self.trainer, self.cfg
        b = images.shape[0]
        scores = tcm_kernels.patch_scores(saliency, t.model.patch_size, reduce="mean")
        kw = dict(roi_threshold=cfg.roi_threshold, roi_mask_ratio=cfg.roi_mask_ratio)
        ratio = cfg.ratio_at(step)
        # both views in one forward: one DDP pass, and the norms see both
        views = torch.cat([t.mask(scores, "stratified", ratio, 2 * draw + v, **kw) for v in (0, 1)])
        out = t.forward(torch.cat([images, images]), views)
        z = self.head_nets["head"](out.embedding)
        contrastive = tcm_kernels.info_nce(z[:b], z[b:], temperature=cfg.temperature, normalize=True,
                                           gather=t.world > 1)
        recon = out.loss  # the mean over both views' masked patches (each row masks the same count)
        return {"loss": recon + cfg.contrastive_weight * contrastive, "recon": recon, "contrastive": contrastive,
                "ccl": self.zero()}
