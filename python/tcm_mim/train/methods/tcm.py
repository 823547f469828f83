"""TCM: text-guided masking of two views, reconstruction plus (this package's addition) InfoNCE between them.

Masking (``tcm_masking``, docs/methods.md): ``region_ratios`` masks fixed shares of each image's ROI and
background patches (the authors' code; ROI = any saliency >= ``roi_threshold`` in the patch); ``overall`` masks
``mask_ratio`` of all patches with ``roi_mask_ratio`` of them on ROI (mean saliency >= ``roi_threshold``).
The realised shares (overall, ROI, background) are logged every step.
"""

from __future__ import annotations

import torch
from torch import nn

import tcm_kernels

from ...masking import realised_ratios, region_ratio_mask
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

    def views(self, saliency: torch.Tensor, step: int, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views' masks, visible bool [2B, N] (view 0 rows, then view 1), and the ROI bool [B, N]."""
        t, cfg = self.trainer, self.cfg
        if cfg.tcm_masking == "region_ratios":
            # The authors' binary masks: ROI = any positive value in the patch. Saliency maps here are soft
            # (blurred label edges, atlas and CLIPSeg probabilities), so "any" is any value >= roi_threshold.
            roi = tcm_kernels.patch_scores(saliency, t.model.patch_size, reduce="max") >= cfg.roi_threshold
            views = [region_ratio_mask(roi, cfg.region_roi_ratio, cfg.region_background_ratio, seed=cfg.seed,
                                       offset=2 * draw + v) for v in (0, 1)]
        else:
            scores = tcm_kernels.patch_scores(saliency, t.model.patch_size, reduce="mean")
            roi = scores >= cfg.roi_threshold  # sample_mask's ROI rule
            kw = dict(roi_threshold=cfg.roi_threshold, roi_mask_ratio=cfg.roi_mask_ratio)
            views = [t.mask(scores, "stratified", cfg.ratio_at(step), 2 * draw + v, **kw) for v in (0, 1)]
        return torch.cat(views), roi

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t, cfg = self.trainer, self.cfg
        b = images.shape[0]
        views, roi = self.views(saliency, step, draw)
        # both views in one forward: one DDP pass, and the norms see both
        out = t.forward(torch.cat([images, images]), views)
        z = self.head_nets["head"](out.embedding)
        contrastive = tcm_kernels.info_nce(z[:b], z[b:], temperature=cfg.temperature, normalize=True,
                                           gather=t.world > 1)
        recon = out.loss  # the mean over both views' masked patches
        return {"loss": recon + cfg.contrastive_weight * contrastive, "recon": recon, "contrastive": contrastive,
                "ccl": self.zero(), **realised_ratios(views, torch.cat([roi, roi]))}
