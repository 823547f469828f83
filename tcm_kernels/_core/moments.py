"""Chan's merge of partial moments, shared by the norm engine's back ends and its statistic groups."""

from __future__ import annotations

import torch


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                  dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of the union of disjoint parts laid along ``dim`` (kept, size 1).

    count broadcasts against mean (e.g. [S, K, 1] against [S, K, C]); an empty union gives
    mean 0 and M2 0. Never forms sum(x^2) - n mean^2, so a large mean cannot cancel the variance.
    """
    count = count.expand_as(mean)
    n = count.sum(dim, keepdim=True)
    mu = (count * mean).sum(dim, keepdim=True) / n.clamp_min(1)
    m2 = (m2 + count * (mean - mu) ** 2).sum(dim, keepdim=True)
    return n, mu, m2
