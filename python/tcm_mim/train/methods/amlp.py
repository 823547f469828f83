"""AMLP: cluster- and difficulty-guided masking, attention-weighted reconstruction, category consistency.

The losses are defined in :mod:`tcm_mim.train.amlp`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..amlp import attention_recon_loss, category_consistency_loss, ccl_targets
from .base import Method, register


@register
class AMLP(Method):
    name = "amlp"

    @classmethod
    def ratio_at(cls, cfg, step: int) -> float:
        """The adaptive ratio: linear from ``amlp_ratio_start`` to ``amlp_ratio_end`` over the run."""
        t = min(step / max(cfg.steps - 1, 1), 1.0)
        return cfg.amlp_ratio_start + t * (cfg.amlp_ratio_end - cfg.amlp_ratio_start)

    def build_heads(self, width: int) -> dict[str, nn.Module]:
        return {"ccl_head": nn.Linear(width, 1)}  # the lesion logit of each patch's encoder features

    def loss(self, images: torch.Tensor, saliency: torch.Tensor, step: int, draw: int) -> dict[str, torch.Tensor]:
        t, cfg = self.trainer, self.cfg
        scores, lesion, difficulty = self.cluster_categories(images, draw)
        visible = t.mask(scores, "weighted", cfg.ratio_at(step), 2 * draw)
        out = t.forward(images, visible)
        recon = attention_recon_loss(out.per_patch, visible)
        logits = self.head_nets["ccl_head"](out.patch_features.transpose(1, 2)).squeeze(-1)
        ccl = category_consistency_loss(logits, ccl_targets(lesion, difficulty, cfg.amlp_ccl_blend), visible)
        return {"loss": recon + cfg.amlp_ccl_weight * ccl, "recon": recon, "contrastive": self.zero(), "ccl": ccl}

    def cluster_categories(self, images: torch.Tensor, draw: int):
        """k-means of patch descriptors into lesion/background, with each patch's difficulty.

        Returns (scores float [B, N] > 0 for the weighted sampler: cluster membership blended with
        difficulty, lesion bool [B, N], difficulty float [B, N]: each patch's loss when masked), on
        the images' device. The k-means runs on the host (a small [N, 3] problem per image, with a
        CPU generator for its deterministic initialisation): one device-to-host copy per batch.
        """
        from ...localize import ClusterGuide

        t = self.trainer
        difficulty = t.per_patch_difficulty(t.model, images, draw)
        host_images, host_difficulty = images.float().cpu(), difficulty.cpu()
        scores, lesion = [], []
        for i in range(images.shape[0]):
            guide = ClusterGuide(t.model.patch_size, patch_loss=lambda _img, row=host_difficulty[i]: row,
                                 seed=self.cfg.seed)
            in_lesion, scaled = guide.categorize(host_images[i, 0])
            lesion.append(in_lesion)
            scores.append(guide.cluster_weight * in_lesion.float() + (1 - guide.cluster_weight) * scaled)
        # + 1e-6: every patch stays eligible
        return (torch.stack(scores) + 1e-6).to(t.device), torch.stack(lesion).to(t.device), difficulty
