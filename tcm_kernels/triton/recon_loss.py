"""Triton kernels of masked_recon_loss, mirroring csrc/recon_loss/recon_loss_cpu.cpp.

One program per (sample, patch). The patch's D = C * pd * ph * pw elements are
walked in BLOCK tiles; element e is row r = e // pw (rows run over c, z, y) and
column e % pw, addressed in place from the image strides: no patchified copy.
With norm_pix the target patch is read three times (sum, squared deviations,
squared error); on a GPU the patch (a few KB) stays in L1/L2 between passes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._core.dtypes import accumulation_dtype
from ._launch import launch

_BLOCK = 512


@triton.jit
def _patch_offsets(e, origin, D, H, W, pd, ph, pw):
    r = e // pw  # int32 divisions (e < C * pd * ph * pw); int64 products: a sample may exceed 2^31 elements
    y = r % ph
    z = (r // ph) % pd
    c = (r // (ph * pd)).to(tl.int64)
    return origin + ((c * D + z) * H + y) * W + e % pw


@triton.jit
def _patch_origin(k, n_patches, image, D, H, W, pd, ph, pw, gh, gw):
    b = k // n_patches
    n = k % n_patches
    zw = n % gw
    zh = (n // gw) % gh
    zd = n // (gw * gh)
    return b * image + ((zd * pd) * H + zh * ph) * W + zw * pw


@triton.jit
def _target_stats(T, origin, n_elems, eps, D, H, W, pd, ph, pw, acc_ty: tl.constexpr, NORM_PIX: tl.constexpr,
                  BLOCK: tl.constexpr):
    mean = tl.zeros((), acc_ty)
    rstd = tl.zeros((), acc_ty) + 1.0
    if NORM_PIX:
        s = tl.zeros((BLOCK,), acc_ty)
        for start in range(0, n_elems, BLOCK):
            e = start + tl.arange(0, BLOCK)
            t = tl.load(T + _patch_offsets(e, origin, D, H, W, pd, ph, pw), mask=e < n_elems, other=0).to(acc_ty)
            s += t
        mean = tl.sum(s, 0) / n_elems
        q = tl.zeros((BLOCK,), acc_ty)
        for start in range(0, n_elems, BLOCK):
            e = start + tl.arange(0, BLOCK)
            inb = e < n_elems
            t = tl.load(T + _patch_offsets(e, origin, D, H, W, pd, ph, pw), mask=inb, other=0).to(acc_ty)
            d = tl.where(inb, t - mean, 0.0)
            q += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(q, 0) / (n_elems - 1) + eps)
    return mean, rstd


@triton.jit
def _residual(P, T, off, inb, mean, rstd, acc_ty: tl.constexpr):
    """pred - normalized target at the offsets ``off`` of one patch."""
    p = tl.load(P + off, mask=inb, other=0).to(acc_ty)
    t = tl.load(T + off, mask=inb, other=0).to(acc_ty)
    return p - (t - mean) * rstd


@triton.jit
def _forward_kernel(P, T, OUT, eps, n_patches, image, D, H, W, pd, ph, pw, gh, gw, n_elems,
                    NORM_PIX: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)  # int64 offsets: images may exceed 2^31 elements
    acc_ty = OUT.dtype.element_ty
    origin = _patch_origin(k, n_patches, image, D, H, W, pd, ph, pw, gh, gw)
    mean, rstd = _target_stats(T, origin, n_elems, eps, D, H, W, pd, ph, pw, acc_ty, NORM_PIX, BLOCK)
    se = tl.zeros((BLOCK,), acc_ty)
    for start in range(0, n_elems, BLOCK):
        e = start + tl.arange(0, BLOCK)
        inb = e < n_elems
        off = _patch_offsets(e, origin, D, H, W, pd, ph, pw)
        d = tl.where(inb, _residual(P, T, off, inb, mean, rstd, acc_ty), 0.0)
        se += d * d
    tl.store(OUT + k, tl.sum(se, 0) / n_elems)


@triton.jit
def _backward_kernel(G, P, T, GRAD, eps, n_patches, image, D, H, W, pd, ph, pw, gh, gw, n_elems,
                     NORM_PIX: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)  # int64 offsets: images may exceed 2^31 elements
    acc_ty = G.dtype.element_ty
    origin = _patch_origin(k, n_patches, image, D, H, W, pd, ph, pw, gh, gw)
    w = tl.load(G + k) * 2.0 / n_elems
    mean, rstd = _target_stats(T, origin, n_elems, eps, D, H, W, pd, ph, pw, acc_ty, NORM_PIX, BLOCK)
    for start in range(0, n_elems, BLOCK):
        e = start + tl.arange(0, BLOCK)
        inb = e < n_elems
        off = _patch_offsets(e, origin, D, H, W, pd, ph, pw)
        tl.store(GRAD + off, (w * _residual(P, T, off, inb, mean, rstd, acc_ty)).to(GRAD.dtype.element_ty), mask=inb)


def _geometry(shape: torch.Size, patch_size: list[int]):
    spatial, ps = list(shape[2:]), list(patch_size)
    if len(spatial) == 2:
        spatial, ps = [1] + spatial, [1] + ps
    d, h, w = spatial
    pd, ph, pw = ps
    grid = (d // pd, h // ph, w // pw)
    return (d, h, w, pd, ph, pw, grid[1], grid[2]), math.prod(grid), shape[1] * pd * ph * pw


def _launch_args(pred: torch.Tensor, patch_size: list[int]):
    geo, n_patches, n_elems = _geometry(pred.shape, patch_size)
    image = math.prod(pred.shape[1:])
    block = min(_BLOCK, max(16, triton.next_power_of_2(n_elems)))
    return geo, n_patches, n_elems, image, block


def recon_loss_forward(pred: torch.Tensor, target: torch.Tensor, patch_size: list[int], norm_pix: bool,
                       eps: float) -> torch.Tensor:
    geo, n_patches, n_elems, image, block = _launch_args(pred, patch_size)
    out = torch.empty(pred.shape[0], n_patches, dtype=accumulation_dtype(pred.dtype), device=pred.device)
    launch("masked_recon_loss", _forward_kernel, (out.numel(),), pred.device, pred.contiguous(),
           target.contiguous(), out, eps, n_patches, image, *geo, n_elems, NORM_PIX=norm_pix, BLOCK=block)
    return out


def recon_loss_backward(grad_per_patch: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                        patch_size: list[int], norm_pix: bool, eps: float) -> torch.Tensor:
    geo, n_patches, n_elems, image, block = _launch_args(pred, patch_size)
    pred = pred.contiguous()
    grad = torch.empty_like(pred)
    launch("masked_recon_loss", _backward_kernel, (grad_per_patch.numel(),), pred.device,
           grad_per_patch.contiguous(), pred, target.contiguous(), grad, eps, n_patches, image, *geo, n_elems,
           NORM_PIX=norm_pix, BLOCK=block)
    return grad
