"""Masked reconstruction loss of MAE / SparK: per-patch normalized-pixel MSE on masked patches.

For sample b and patch n (patches of ``patch_size`` in row-major grid order, the
order of :func:`tcm_kernels.patch_scores` and :func:`tcm_kernels.sample_mask`)::

    t_hat = (t - mean(t)) / sqrt(var(t) + eps)   if norm_pix else t
    per_patch[b, n] = mean over the patch's C * prod(patch_size) elements of (pred - t_hat)^2
    loss = sum(per_patch * masked) / max(sum(masked), 1),   masked = ~visible

mean/var are over the C * prod(patch_size) elements of the target patch, var
unbiased (divisor D - 1, ``Tensor.var`` as in MAE), eps inside the square root:
``(var + eps) ** 0.5``. ``per_patch`` is defined for every patch: on masked
patches it is what the loss averages; on visible patches it is the same error
measured where the model saw the input (a reconstruction-quality signal, e.g. for
an EMA teacher's hardest-patch guidance in AnatoMask, or AMLP's weighting). Its
gradient flows to pred like the loss's. With no masked patch at all, loss = 0 with
zero gradient (instead of 0 / 0).

The compiled kernel reads every patch in place (one task per (sample, patch), no
patchified copies); forward writes only ``per_patch`` [B, N], backward writes only
the gradient of pred. The target is data: it gets no gradient.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_real, check_same_device, check_tensor
from .._core import shapes
from ..reference import recon_loss as _ref
from ._library import register

_OP = "masked_recon_loss"


@torch.library.custom_op("tcm::recon_loss_forward_triton", mutates_args=())
def _forward_triton(pred: torch.Tensor, target: torch.Tensor, patch_size: list[int], norm_pix: bool,
                    eps: float) -> torch.Tensor:
    """Triton back end of ``tcm::recon_loss_forward``; triton is imported on first use."""
    from ..triton.recon_loss import recon_loss_forward

    return recon_loss_forward(pred, target, patch_size, norm_pix, eps)


@torch.library.custom_op("tcm::recon_loss_backward_triton", mutates_args=())
def _backward_triton(grad_per_patch: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, patch_size: list[int],
                     norm_pix: bool, eps: float) -> torch.Tensor:
    """Triton back end of ``tcm::recon_loss_backward``."""
    from ..triton.recon_loss import recon_loss_backward

    return recon_loss_backward(grad_per_patch, pred, target, patch_size, norm_pix, eps)


for _suffix in ("", "_triton"):
    register(f"recon_loss_forward{_suffix}", shapes.recon_loss_forward)
    register(f"recon_loss_backward{_suffix}", shapes.recon_loss_backward)


def _kernels(backend: str):
    suffix = "_triton" if backend == "triton" else ""
    return getattr(torch.ops.tcm, f"recon_loss_forward{suffix}"), getattr(torch.ops.tcm, f"recon_loss_backward{suffix}")


class _PerPatchLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, patch_size, norm_pix, eps, backend):
        fwd, _ = _kernels(backend)
        pred, target = pred.contiguous(), target.contiguous()
        ctx.save_for_backward(pred, target)
        ctx.args = (patch_size, norm_pix, eps, backend)
        return fwd(pred, target, patch_size, norm_pix, eps)

    @staticmethod
    def backward(ctx, grad_per_patch):
        pred, target = ctx.saved_tensors
        patch_size, norm_pix, eps, backend = ctx.args
        _, bwd = _kernels(backend)
        grad_pred = bwd(grad_per_patch.contiguous(), pred, target, patch_size, norm_pix, eps)
        return grad_pred, None, None, None, None, None


def _patch_tuple(patch_size, spatial: tuple[int, ...]) -> list[int]:
    ps = [patch_size] * len(spatial) if isinstance(patch_size, int) else list(patch_size)
    if len(ps) != len(spatial) or any([isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in ps]):
        raise ValueError(f"{_OP}: patch_size must be a positive int or {len(spatial)} positive ints, "
                         f"got {patch_size!r}")
    if any([s % p for s, p in zip(spatial, ps)]):
        raise ValueError(f"{_OP}: patch_size {tuple(ps)} must divide the spatial shape {spatial}")
    return ps


@autocast_rule("fp32")
def masked_recon_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor,
                      patch_size: int | tuple[int, ...], norm_pix: bool = True, eps: float = 1e-6, *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch normalized-pixel MSE averaged over the masked patches (module docstring).

    Args:
        pred: float [B, C, H, W] or [B, C, D, H, W], the reconstruction.
        target: same shape and dtype as pred, the image (no gradient).
        visible: bool [B, N], True = kept patch; N = prod(S_i / p_i). The loss is
            over the masked patches (~visible).
        patch_size: int or one int per spatial dim; must divide the spatial shape.
        norm_pix: bool (TypeError otherwise); normalize each target patch by its mean and
            unbiased variance.
        eps: added to the variance inside the square root; finite, > 0 when norm_pix (a
            constant patch would divide 0 by 0), >= 0 otherwise.
        backend: force ``"reference" | "cpu" | "triton"``.

    Returns:
        (loss, per_patch): loss a 0-D float32 tensor (float64 for float64 input),
        per_patch float [B, N] in the same dtype.
    """
    check_tensor(_OP, "pred", pred, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "target", target, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "visible", visible, ndim=2, dtypes=(torch.bool,))
    if target.shape != pred.shape or target.dtype != pred.dtype:
        raise ValueError(f"{_OP}: target must match pred in shape and dtype {tuple(pred.shape)} {pred.dtype}, "
                         f"got {tuple(target.shape)} {target.dtype}")
    check_same_device(_OP, pred=pred, target=target, visible=visible)
    if not isinstance(norm_pix, bool):  # a truthy string such as "no" must not switch normalization on
        raise TypeError(f"{_OP}: norm_pix must be a bool, got {type(norm_pix).__name__} {norm_pix!r}")
    ps = _patch_tuple(patch_size, tuple(pred.shape[2:]))
    n = math.prod([s // p for s, p in zip(pred.shape[2:], ps)])
    if tuple(visible.shape) != (pred.shape[0], n):
        raise ValueError(f"{_OP}: visible must be [B, N] = [{pred.shape[0]}, {n}] for patch_size {tuple(ps)}, "
                         f"got shape {tuple(visible.shape)}")
    if norm_pix and pred.shape[1] * math.prod(ps) < 2:
        raise ValueError(f"{_OP}: norm_pix needs at least 2 elements per patch (unbiased variance), "
                         f"got C * prod(patch_size) = {pred.shape[1] * math.prod(ps)}")
    # With norm_pix, eps = 0 divides a constant patch (variance 0) by 0: NaN. Without it eps is unused.
    eps = check_real(_OP, "eps", eps, low=0.0, high=float("inf"), low_open=norm_pix, high_open=True)
    chosen = _backend.choose_backend("recon_loss_forward", pred.device, backend)
    if chosen == "reference":
        return _ref.masked_recon_loss(pred, target, visible, tuple(ps), norm_pix, eps)
    per_patch = _PerPatchLoss.apply(pred, target, ps, norm_pix, eps, chosen)
    masked = (~visible).to(per_patch.dtype)
    loss = (per_patch * masked).sum() / masked.sum().clamp_min(1)
    return loss, per_patch
