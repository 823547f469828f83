"""Plain-PyTorch reference of the CORAL loss (Sun & Saenko, Deep CORAL, 2016)."""

from __future__ import annotations

import torch


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows of x [n, d] -> [d, d] (centred, 1/(n-1))."""
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||C_s - C_t||_F^2 / (4 d^2), computed in the dtype of the inputs."""
    d = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)
