"""No-grad passes beside the trained model: the EMA teacher (AnatoMask) and difficulty probes (AnatoMask, AMLP).

A probe runs a model in eval mode (norms on running statistics, no drop path) so that its extra batch does not
move the running statistics of the model being trained; :func:`eval_mode` restores every submodule's mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's own training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def masked_probe_scores(per_patch: torch.Tensor, probe_visible: torch.Tensor) -> torch.Tensor:
    """AnatoMask's selection signal: the probe's per-patch error where the probe masked the patch, 0 where it
    left it visible (no loss constrains a prediction at a visible patch, so its error must not compete).

    Args:
        per_patch: float [B, N], the probe's per-patch reconstruction error.
        probe_visible: bool [B, N], the probe's mask (True = kept).

    Returns:
        float32 [B, N] >= 0.
    """
    return torch.where(probe_visible, 0.0, per_patch.float().clamp_min(0))


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, *, average_buffers: bool = True) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for the parameters.

    Buffers: with ``average_buffers`` the floating ones (running statistics, which an eval-mode teacher normalises
    with) are averaged the same way and integer ones (batch counters) copied; without it (the mean teacher of
    fine-tuning, whose norms track the student's statistics) every buffer is copied.
    """
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        for t, s in zip(teacher.buffers(), student.buffers()):
            if average_buffers and t.is_floating_point():
                t.mul_(momentum).add_(s, alpha=1 - momentum)
            else:
                t.copy_(s)
