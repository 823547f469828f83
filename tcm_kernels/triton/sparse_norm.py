"""Triton kernels of the sparse (masked) normalizations, mirroring csrc/sparse_norm/sparse_norm_cpu.cpp.

Layout: x [B, C, L] contiguous, mask bool [B, L]; per-plane tensors [B, C] in the
accumulation dtype (float32, float64 for float64 x). bf16/fp16 math is upcast.

* reductions (moments, grad moments): one program per (b, c) plane walking L in
  BLOCK tiles in a fixed order; a tile is reduced exactly (sum, then squared
  deviations from the tile mean) and merged into the running (count, mean, M2)
  with Chan's formula. No atomics: deterministic.
* elementwise passes (scale_shift, norm_backward): a 1-D grid over (plane, L tile) pairs,
  :func:`elementwise_grid` (a 2-D grid would cap L at 65,535 tiles: 67,107,840 sites).
Every launch goes through ``_launch.launch`` (device guard, grid limits).
``tcm_kernels.ops`` registers each launcher as a ``tcm::<name>_triton`` custom op, so torch.compile
treats it as one op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.dtypes import accumulation_dtype
from ._launch import launch

_BLOCK = 1024


@triton.jit
def _moments_kernel(X, MASK, COUNT, MEAN, M2, C, L, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * C + c; int64 offsets: tensors may exceed 2^31 elements
    b = plane // C
    acc_ty = MEAN.dtype.element_ty
    n = tl.zeros((), acc_ty)
    mean = tl.zeros((), acc_ty)
    m2 = tl.zeros((), acc_ty)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < L
        on = tl.load(MASK + b * L + offs, mask=inb, other=0) != 0
        # selects, not products with the mask: values at inactive sites (even NaN/inf) are ignored
        x = tl.where(on, tl.load(X + plane * L + offs, mask=inb, other=0).to(acc_ty), 0.0)
        cnt = tl.sum(on.to(acc_ty), 0)
        tile_mean = tl.sum(x, 0) / tl.maximum(cnt, 1.0)
        dev = tl.where(on, x - tile_mean, 0.0)
        q = tl.sum(dev * dev, 0)
        total = n + cnt
        share = cnt / tl.maximum(total, 1.0)   # 0 for an empty tile: nothing changes
        delta = tile_mean - mean
        mean += delta * share
        m2 += q + delta * delta * n * share
        n = total
    tl.store(MEAN + plane, mean)
    tl.store(M2 + plane, m2)
    tl.store(COUNT + b, n, mask=(plane % C) == 0)


@triton.jit
def _plane_tile(L, BLOCK: tl.constexpr):
    """(plane, offsets in it) of this program of :func:`elementwise_grid`, int64."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(L, BLOCK)
    return pid // tiles, (pid % tiles) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _scale_shift_kernel(X, MASK, CENTER, SCALE, SHIFT, Y, C, L, BLOCK: tl.constexpr):
    plane, offs = _plane_tile(L, BLOCK)
    inb = offs < L
    acc_ty = SCALE.dtype.element_ty
    on = tl.load(MASK + (plane // C) * L + offs, mask=inb, other=0) != 0
    x = tl.load(X + plane * L + offs, mask=inb, other=0).to(acc_ty)
    y = (x - tl.load(CENTER + plane)) * tl.load(SCALE + plane) + tl.load(SHIFT + plane)
    tl.store(Y + plane * L + offs, tl.where(on, y, 0.0).to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _grad_moments_kernel(DY, X, MASK, CENTER, SUM_DY, SUM_DY_XC, C, L, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    acc_ty = CENTER.dtype.element_ty
    mu = tl.load(CENTER + plane)
    s1 = tl.zeros((BLOCK,), acc_ty)
    s2 = tl.zeros((BLOCK,), acc_ty)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < L
        on = tl.load(MASK + b * L + offs, mask=inb, other=0) != 0
        g = tl.where(on, tl.load(DY + plane * L + offs, mask=inb, other=0).to(acc_ty), 0.0)
        x = tl.where(on, tl.load(X + plane * L + offs, mask=inb, other=0).to(acc_ty), 0.0)
        s1 += g
        s2 += tl.where(on, g * (x - mu), 0.0)
    tl.store(SUM_DY + plane, tl.sum(s1, 0))
    tl.store(SUM_DY_XC + plane, tl.sum(s2, 0))


@triton.jit
def _norm_backward_kernel(DY, X, MASK, DY_SCALE, X_SCALE, CENTER, SHIFT, DX, C, L, BLOCK: tl.constexpr):
    plane, offs = _plane_tile(L, BLOCK)
    inb = offs < L
    acc_ty = CENTER.dtype.element_ty
    on = tl.load(MASK + (plane // C) * L + offs, mask=inb, other=0) != 0
    g = tl.load(DY + plane * L + offs, mask=inb, other=0).to(acc_ty)
    x = tl.load(X + plane * L + offs, mask=inb, other=0).to(acc_ty)
    dx = g * tl.load(DY_SCALE + plane) + (x - tl.load(CENTER + plane)) * tl.load(X_SCALE + plane) \
        + tl.load(SHIFT + plane)
    tl.store(DX + plane * L + offs, tl.where(on, dx, 0.0).to(DX.dtype.element_ty), mask=inb)


def _block(length: int) -> int:
    return min(_BLOCK, max(16, triton.next_power_of_2(max(length, 1))))


def elementwise_grid(planes: int, length: int, block: int) -> tuple[int]:
    """Grid of the elementwise kernels: one program per (plane, tile of ``block`` sites), flattened."""
    return (planes * triton.cdiv(length, block),)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, c, length = x.shape
    x, mask = x.contiguous(), mask.contiguous()
    count = torch.zeros(b, dtype=accumulation_dtype(x.dtype), device=x.device)
    mean = torch.empty(b, c, dtype=accumulation_dtype(x.dtype), device=x.device)
    m2 = torch.empty_like(mean)
    launch("sparse_norm", _moments_kernel, (b * c,), x.device, x, mask, count, mean, m2, c, length,
           BLOCK=_block(length))
    if c == 0:
        count = mask.sum(1).to(accumulation_dtype(x.dtype))
    return count, mean, m2


def masked_scale_shift(x: torch.Tensor, mask: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    b, c, length = x.shape
    x, mask = x.contiguous(), mask.contiguous()
    y = torch.empty_like(x)
    blk = _block(length)
    launch("sparse_norm", _scale_shift_kernel, elementwise_grid(b * c, length, blk), x.device, x, mask,
           center.contiguous(), scale.contiguous(), shift.contiguous(), y, c, length, BLOCK=blk)
    return y


def masked_grad_moments(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                        center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, length = x.shape
    sum_dy = torch.zeros(b, c, dtype=accumulation_dtype(x.dtype), device=x.device)
    sum_dy_xc = torch.zeros_like(sum_dy)
    launch("sparse_norm", _grad_moments_kernel, (b * c,), x.device, dy.contiguous(), x.contiguous(),
           mask.contiguous(), center.contiguous(), sum_dy, sum_dy_xc, c, length, BLOCK=_block(length))
    return sum_dy, sum_dy_xc


def masked_norm_backward(dy: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dy_scale: torch.Tensor,
                         x_scale: torch.Tensor, center: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    b, c, length = x.shape
    x = x.contiguous()
    dx = torch.empty_like(x)
    blk = _block(length)
    launch("sparse_norm", _norm_backward_kernel, elementwise_grid(b * c, length, blk), x.device,
           dy.contiguous(), x, mask.contiguous(), dy_scale.contiguous(), x_scale.contiguous(), center.contiguous(),
           shift.contiguous(), dx, c, length, BLOCK=blk)
    return dx
