"""The terms of supervised, mean-teacher and CORN fine-tuning (2-D and 3-D alike).

Shapes: logits / probabilities [B, K, *S]; decoder features [B, C, *S'] (S' = S / stem
stride); labels int64 [B, *S] or [B, *S']; feature rows [n, C]. See docs/finetune.md for
what follows the CORN paper and what is our own reading of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import tcm_kernels

from ..train.teacher import ema_update as teacher_ema_update


def supervised_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the foreground classes (MONAI's DiceLoss, batch-wise)."""
    from monai.losses import DiceLoss

    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    return F.cross_entropy(logits, target) + dice(logits, target.unsqueeze(1))


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the softmax maps (Tarvainen & Valpola's mean teacher); teacher detached."""
    return (student_logits.softmax(1) - teacher_logits.detach().softmax(1)).pow(2).mean()


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1]; 1 when length is 0 (Laine & Aila)."""
    if length == 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """teacher <- a teacher + (1 - a) student with a = min(1 - 1 / (step + 1), decay); buffers (norm
    statistics) are copied. Returns a. At step 0 the teacher becomes the student."""
    a = min(1.0 - 1.0 / (step + 1), decay)
    teacher_ema_update(teacher, student, a, average_buffers=False)
    return a


def feature_rows(features: torch.Tensor) -> torch.Tensor:
    """[B, C, *S'] -> [B * prod(S'), C] (one row per site, in the order of ``labels.reshape(-1)``)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def to_feature_grid(labels: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Labels [B, *S] -> [B, *size], nearest neighbour (the class at each feature site)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def teacher_confidence(teacher_logits: torch.Tensor, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-label [B, *size], confidence [B, *size]): softmax averaged over each feature site's
    pixels, then its argmax and max."""
    probs = F.adaptive_avg_pool3d(teacher_logits.softmax(1), size) if len(size) == 3 else \
        F.adaptive_avg_pool2d(teacher_logits.softmax(1), size)
    conf, label = probs.max(1)
    return label, conf


def _subsample(rows: torch.Tensor, max_rows: int, gen: torch.Generator | None) -> torch.Tensor:
    if rows.shape[0] <= max_rows:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=gen, device="cpu")[:max_rows].to(rows.device)]


def ccm_loss(labelled: torch.Tensor, labels: torch.Tensor, unlabelled: torch.Tensor, pseudo: torch.Tensor,
             keep: torch.Tensor, num_classes: int, *, max_rows: int = 1024,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """CORAL-correlation consistency: mean over classes of ``coral_loss`` between the labelled rows of
    that class and the unlabelled rows the teacher assigns to it.

    Args:
        labelled: [n_l, C] feature rows of labelled images; labels: int [n_l] their classes.
        unlabelled: [n_u, C] rows of unlabelled images; pseudo: int [n_u] teacher classes;
            keep: bool [n_u], the rows whose teacher confidence exceeds tau.
        num_classes: K (background included: its covariance is aligned too).
        max_rows: rows per class and side, drawn at random beyond it (bounds the d x n GEMMs).

    Returns:
        0-dim; classes with fewer than 2 rows on either side are skipped; 0 (with a graph) if all are.
    """
    terms = []
    for c in range(num_classes):
        lab = labelled[labels == c]
        unl = unlabelled[(pseudo == c) & keep]
        if lab.shape[0] >= 2 and unl.shape[0] >= 2:
            terms.append(tcm_kernels.coral_loss(_subsample(lab, max_rows, gen), _subsample(unl, max_rows, gen)))
    if not terms:
        return labelled.sum() * 0.0 + unlabelled.sum() * 0.0
    return torch.stack(terms).mean()


def similarity_consistency_loss(student: torch.Tensor, teacher: torch.Tensor, pool: torch.Tensor,
                                temperature: float) -> torch.Tensor:
    """KL(P_teacher || P_student) averaged over rows, P = softmax(cos(row, pool) / temperature).

    student, teacher: [n, C] features of the same sites; pool: [m, C] (constant). 0 when the
    student's rows equal the teacher's.
    """
    pool = F.normalize(pool.detach(), dim=1)
    log_s = (F.normalize(student, dim=1) @ pool.T / temperature).log_softmax(1)
    log_t = (F.normalize(teacher.detach(), dim=1) @ pool.T / temperature).log_softmax(1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


class DynamicFeaturePool(nn.Module):
    """CORN's dynamic feature pool: teacher features of unlabelled sites whose confidence exceeds tau,
    kept in a :class:`tcm_kernels.CovarianceQueue` (FIFO of ``capacity`` rows, running covariance).

    ``select`` keeps exactly the confident rows (the "removal of wrongly selected features"),
    ``push`` adds them, ``rows`` is the pool the similarity matrices are taken against.
    """

    def __init__(self, dim: int, capacity: int, tau: float):
        super().__init__()
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"DynamicFeaturePool: tau must be in [0, 1), got {tau}")
        self.tau = tau
        self.queue = tcm_kernels.CovarianceQueue(dim, capacity)

    def __len__(self) -> int:
        return len(self.queue)

    def select(self, features: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Rows of features [n, C] whose confidence [n] is > tau."""
        return features[confidence > self.tau]

    def push(self, rows: torch.Tensor) -> None:
        self.queue.push(rows.detach())

    def rows(self) -> torch.Tensor:
        """The pooled rows [len(self), C] (the queue fills its slots in order, then overwrites the oldest)."""
        return self.queue.features[:len(self.queue)]


def perturb(images: torch.Tensor, *, noise_std: float, intensity: float, flip: bool,
            gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Gaussian noise (clipped at 2 std), intensity scale/shift and (if ``flip``) random flips of
    each spatial axis; returns the images and the flipped axes (undo with ``.flip(axes)``)."""
    b, spatial = images.shape[0], images.dim() - 2
    shape = (b,) + (1,) * (spatial + 1)
    noise = (torch.randn(images.shape, generator=gen) * noise_std).clamp(-2 * noise_std, 2 * noise_std)
    scale = 1 + (torch.rand(shape, generator=gen) * 2 - 1) * intensity
    shift = (torch.rand(shape, generator=gen) * 2 - 1) * intensity
    out = images * scale.to(images.device) + shift.to(images.device) + noise.to(images.device)
    axes = tuple(2 + a for a in range(spatial) if flip and bool(torch.rand((), generator=gen) < 0.5))
    return (out.flip(axes) if axes else out), axes
