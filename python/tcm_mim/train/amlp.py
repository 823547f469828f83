"""AMLP's losses (Wang et al., arXiv 2309.04312), as defined for this package.

AMLP has four parts; the sampler (masked patch selection by k-means into lesion vs background,
``ClusterGuide``) and the masking-ratio ramp (``PretrainConfig.ratio_at``) live elsewhere. The
two losses are here. We could not consult the paper's equations, so the definitions below are
our reading of its description, written out so that they can be checked:

* **Attention (relative) reconstruction loss**: every masked patch's reconstruction error is
  weighted by ``1 + e_p / mean(e over the masked patches of its image)`` (the weight is not
  differentiated), so patches that are hard to reconstruct *within their image*, likely lesions,
  count more; per image, so that an image that is hard overall (another scanner, noise) does not
  take the weight from the lesions of the others.
* **Category consistency loss (CCL)**, "refines patch categorization based on reconstruction
  difficulty, strengthening the distinction between lesions and background":
  a linear head on the encoder's deepest per-patch features predicts one logit per patch,
  ``P(lesion)``. Its target blends the k-means category with the reconstruction difficulty::

      t_p = (1 - blend) * c_p + blend * h_p
      c_p = 1 if patch p is in the k-means lesion cluster of its image, else 0
      h_p = 1 if d_p > median over the image's patches of d, else 0

  where ``d_p`` is the patch's reconstruction loss when it is masked. CCL is the binary cross-entropy
  ``softplus(x_p) - t_p * x_p`` of the logit ``x_p`` averaged over the *visible* patches of the
  training view (only they have encoder features; masked patches are empty in a sparse encoder).
  Its gradient reaches the head and the encoder: the encoder learns features that separate lesion
  from background, and the categories it is taught are corrected by what is hard to reconstruct.
"""

from __future__ import annotations

import torch


def attention_recon_loss(per_patch: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Masked patches' loss weighted by ``1 + e_p / mean(e of its image's masked patches)``.

    Args:
        per_patch: float [B, N] reconstruction error of every patch.
        visible: bool [B, N], True = kept (not in the loss).

    Returns:
        0-D: sum(w * e * m) / sum(w * m) over the masked patches m.
    """
    masked = (~visible).to(per_patch.dtype)
    difficulty = per_patch.detach() * masked
    image_mean = difficulty.sum(1, keepdim=True) / masked.sum(1, keepdim=True).clamp_min(1)
    weight = 1 + difficulty / image_mean.clamp_min(1e-12)
    return (weight * per_patch * masked).sum() / (weight * masked).sum()


def ccl_targets(lesion: torch.Tensor, difficulty: torch.Tensor, blend: float) -> torch.Tensor:
    """CCL targets ``(1 - blend) * c + blend * [d > median of the image's d]``.

    Args:
        lesion: bool [B, N], the k-means lesion cluster.
        difficulty: float [B, N], each patch's reconstruction loss when masked.
        blend: in [0, 1]; 0 = the clusters alone, 1 = the difficulty split alone.

    Returns:
        float32 [B, N] in [0, 1].
    """
    median = torch.quantile(difficulty.float(), 0.5, dim=1, keepdim=True)  # the mid-point for even N
    hard = (difficulty > median).float()
    return (1 - blend) * lesion.float() + blend * hard


def category_consistency_loss(logits: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the lesion logits against the CCL targets over the visible patches.

    Args:
        logits: float [B, N], the category head's output per patch.
        targets: float [B, N] in [0, 1] (:func:`ccl_targets`).
        visible: bool [B, N], the patches the encoder saw.

    Returns:
        0-D float32 (zero when no patch is visible).
    """
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    weight = visible.float()
    return (bce * weight).sum() / weight.sum().clamp_min(1)
