"""Memory-efficient InfoNCE (CLIP-style contrastive) loss, tiled as in Inf-CL.

For paired features a, b [B, D] and logits S = a @ b.T / t, the loss is::

    row_i = lse_j S_ij - S_ii            (a_i must pick b_i among all b)
    col_i = lse_j S_ji - S_ii            (b_i must pick a_i among all a)
    loss  = mean_i (row_i + col_i) / 2   (symmetric) or mean_i row_i

which equals ``F.cross_entropy(S, arange(B))`` (averaged with ``S.T``). The B x B
logits are never formed: the compiled kernels fold tiles of S into running
log-sum-exp statistics (forward) and recompute the tiles to build the gradients
(backward), so memory is O(B D + tile^2) instead of O(B^2) (4 GiB of fp32 logits,
plus as much for their gradient, at B = 32768). Only the log-sum-exp vectors cross
the op boundary; the positives S_ii and the reduction are cheap O(B D) PyTorch
code, so every reduction and the temperature gradient follow from autograd.

Non-finite inputs are not checked (that would cost a host synchronisation per
step): they propagate. A NaN or +-inf anywhere in row i of a or b makes the
positive logit S_ii non-finite, hence loss entry i and the mean loss are NaN or inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_real, check_same_device, check_tensor
from .._core import shapes
from .._core.autograd import info_nce_lse_autograd
from .._core.dtypes import accumulation_dtype
from ..reference import info_nce as _ref
from ._library import register

_OP = "info_nce"
REDUCTIONS = ("mean", "sum", "none")
# Rows/columns per tile of the compiled CPU kernel (1 MiB fp32 tiles): the fastest
# of 256/512/1024 on the 2-core development machine at B = 4096, D = 256; big
# enough for an efficient GEMM per tile, small next to the O(B D) inputs.
CPU_BLOCK = 512


# ---- custom ops: fakes and autograd of the compiled and the Triton back end ---------------------------

@torch.library.custom_op("tcm::info_nce_lse_triton", mutates_args=())
def _lse_triton(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, with_col: bool,
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::info_nce_lse`` (block 0 = chosen from D); triton is imported on first use."""
    from ..triton.info_nce import info_nce_lse_triton

    return info_nce_lse_triton(x, y, inv_t, with_col, block)


@torch.library.custom_op("tcm::info_nce_lse_backward_triton", mutates_args=())
def _lse_backward_triton(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, row_lse: torch.Tensor,
                         col_lse: torch.Tensor, grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor,
                         block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::info_nce_lse_backward``: (grad_x, grad_y, grad_inv_t)."""
    from ..triton.info_nce import info_nce_lse_backward_triton

    return info_nce_lse_backward_triton(x, y, inv_t, row_lse, col_lse, grad_row_lse, grad_col_lse, block)


register("info_nce_lse_triton", shapes.info_nce_lse, info_nce_lse_autograd(_lse_backward_triton))
register("info_nce_lse_backward_triton", shapes.info_nce_lse_backward)
if _backend.compiled_available("info_nce_lse"):
    register("info_nce_lse", shapes.info_nce_lse, info_nce_lse_autograd(torch.ops.tcm.info_nce_lse_backward))
    register("info_nce_lse_backward", shapes.info_nce_lse_backward)


def _logsumexp(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, with_col: bool, backend: str,
               block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return _ref.logsumexp_rows_cols(x, y, inv_t, with_col)
    if backend == "triton":
        return torch.ops.tcm.info_nce_lse_triton(x, y, inv_t, with_col, 0 if block_size is None else block_size)
    return torch.ops.tcm.info_nce_lse(x, y, inv_t, with_col, CPU_BLOCK if block_size is None else block_size)


# ---- public function --------------------------------------------------------------------------

def _inverse_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 / temperature as a 0-dim tensor in the accumulation dtype on ``like``'s device (differentiable)."""
    acc = accumulation_dtype(like.dtype)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError(f"{_OP}: temperature must be a float or a floating-point tensor with one element, "
                             f"got {temperature.dtype} tensor of shape {tuple(temperature.shape)}")
        if not torch.compiler.is_compiling():  # one scalar read in eager mode; compiled graphs skip it
            value = float(temperature.detach())
            if not (0.0 < value < math.inf):
                raise ValueError(f"{_OP}: temperature must be in (0, inf), got {value}")
        return (1.0 / temperature.to(device=like.device, dtype=acc)).reshape(())
    t = check_real(_OP, "temperature", temperature, low=0.0, low_open=True, high=math.inf, high_open=True)
    return torch.tensor(1.0 / t, dtype=acc, device=like.device)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenation of x from every rank, with gradients (reduce-scattered back in backward)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x, group=group), dim=0)


def _check_inputs(a: torch.Tensor, b: torch.Tensor, reduction: str, gather: bool, group) -> None:
    check_tensor(_OP, "a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "b", b, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device(_OP, a=a, b=b)
    if a.dtype != b.dtype:
        raise TypeError(f"{_OP}: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{_OP}: a and b must have the same batch size B, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{_OP}: a and b must have the same feature size D, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[1] < 1:
        raise ValueError(f"{_OP}: feature size D must be >= 1, got shape {tuple(a.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if gather:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(f"{_OP}: gather=True needs an initialised torch.distributed process group")
        world = torch.distributed.get_world_size(group)
        if a.shape[0] < 1 or a.shape[0] * world < 2:
            raise ValueError(f"{_OP}: the gathered batch must have B >= 2 pairs, got {a.shape[0]} per rank "
                             f"on {world} ranks")
    elif a.shape[0] < 2:
        raise ValueError(f"{_OP}: batch size B must be >= 2 (one positive and at least one negative), "
                         f"got {a.shape[0]}")


@autocast_rule("fp32")
def info_nce(a: torch.Tensor, b: torch.Tensor, *, temperature: float | torch.Tensor, symmetric: bool = True,
             gather: bool = False, reduction: str = "mean", normalize: bool = False, group=None,
             block_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """InfoNCE loss of paired features without the B x B logits (see the module docstring).

    Args:
        a, b: [B, D] features (fp32/fp16/bf16/fp64, same dtype and device); pair i is (a_i, b_i),
            every other b_j (a_j) is a negative of a_i (b_i).
        temperature: float > 0 or a one-element tensor (e.g. a learnable parameter; its gradient is
            computed). A tensor is checked for > 0 in eager mode only (one scalar read).
        symmetric: average the a->b and b->a cross-entropies (CLIP); else a->b only.
        gather: use the negatives of every rank of ``group`` (all-gather with gradients, equal B per
            rank). Each rank's loss is the mean over its own pairs, so averaging gradients over
            ranks (DDP) gives the gradient of the loss of the concatenated batch.
        reduction: ``"mean" | "sum" | "none"`` over the pairs; ``"none"`` gives [B] (the mean of
            both directions when symmetric).
        normalize: L2-normalise a and b along D first (``F.normalize``, differentiable).
        block_size: rows/columns per tile (default 512 on CPU; chosen from D on Triton, where it must
            be a power of two in [16, 128]).
        backend: force ``"reference" | "cpu" | "triton"``; default: Triton for CUDA tensors,
            the compiled kernel for CPU tensors.

    Returns:
        0-dim loss (or [B] with ``reduction="none"``) in fp32 (fp64 for fp64 inputs): the tiles are
        accumulated in fp32 whatever the input dtype. Gradients flow to a, b and a tensor temperature.
    """
    _check_inputs(a, b, reduction, gather, group)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{_OP}: block_size must be a positive int or None, got {block_size!r}")
    chosen = _backend.choose_backend("info_nce_lse", a.device, backend)
    if backend is None and chosen == "triton" and a.dtype == torch.float64:
        chosen = "reference"  # the Triton kernels take fp32/fp16/bf16; fp64 is a checking dtype
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    inv_t = _inverse_temperature(temperature, a)
    acc = inv_t.dtype
    positive = torch.linalg.vecdot(a.to(acc), b.to(acc)) * inv_t  # S_ii, [B]
    if gather:
        row_lse, _ = _logsumexp(a, _all_gather(b, group), inv_t, False, chosen, block_size)
        per_pair = row_lse - positive
        if symmetric:
            col_lse, _ = _logsumexp(b, _all_gather(a, group), inv_t, False, chosen, block_size)
            per_pair = 0.5 * (per_pair + col_lse - positive)
    else:
        row_lse, col_lse = _logsumexp(a, b, inv_t, symmetric, chosen, block_size)
        per_pair = row_lse - positive
        if symmetric:
            per_pair = 0.5 * (per_pair + col_lse - positive)
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair
