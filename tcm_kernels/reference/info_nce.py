"""Plain-PyTorch reference of the InfoNCE loss: the full B x B logits, no tiling.

``naive_info_nce`` is the ground truth of the tests and the baseline of the
benchmark (what a user writes without this library); ``logsumexp_rows_cols`` is
the reference back end of the tiled log-sum-exp primitive behind
:func:`tcm_kernels.info_nce`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core.dtypes import accumulation_dtype


def naive_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor, *, symmetric: bool = True,
                   reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(a @ b.T / t, arange(B))``, averaged with its transpose when symmetric.

    Computed in the dtype of ``a`` and ``b`` (the B x B logits are materialised).
    ``reduction="none"`` gives the per-pair loss [B] (mean of both directions when symmetric).
    """
    logits = a @ b.T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, labels, reduction=reduction))
    return loss


def logsumexp_rows_cols(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor,
                        with_col: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (and column) log-sum-exp of S = inv_t * x @ y.T in the accumulation dtype.

    x [M, D], y [N, D], inv_t 0-dim -> row_lse [M], col_lse [N] (empty when not ``with_col``).
    """
    acc = accumulation_dtype(x.dtype)
    logits = (x.to(acc) @ y.to(acc).T) * inv_t.to(acc)
    row_lse = torch.logsumexp(logits, dim=1)
    col_lse = torch.logsumexp(logits, dim=0) if with_col else logits.new_empty(0)
    return row_lse, col_lse
