"""Triton kernels of the norm-statistics engine, mirroring csrc/sparse_norm/{sparse_norm,segment_norm}_cpu.cpp.

Two layouts of the same four primitives (moments, scale_shift, grad_moments, norm_backward):

* planes (masked-dense): x [B, C, L] contiguous, mask bool [B, L]; tables [B, C];
* rows (compact): x [N, C] contiguous, segment int64 [N] (any order) or None (one segment);
  tables [S, C].

Tables are in the accumulation dtype (float32, float64 for float64 x); bf16/fp16 math is upcast.

* reductions (moments, grad moments): one program per (b, c) plane walking L in
  BLOCK tiles in a fixed order; a tile is reduced exactly (sum, then squared
  deviations from the tile mean) and merged into the running (count, mean, M2)
  with Chan's formula. No atomics: deterministic.
* rows reductions: the launcher sorts the segment ids (stable) once and finds each segment's
  row range (``searchsorted``); every segment is cut into K equal parts (K from the shape
  alone, :func:`_parts`: about ``_ROWS_PER_PART`` rows of an average segment each, so a batch
  norm of one segment still fills the GPU), one program per (segment, part, channel block)
  walks its part in BLOCK_R-row tiles (Chan's merge per tile) and the [S, K, C] partials are
  merged in torch in a fixed order. No atomics: the same input gives the same bits.
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
from .._core.moments import merge_moments
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


# ----------------------------------------------------------------------------- rows layout (compact)

_ROWS_PER_PART = 2048  # rows of an average segment per program of the rows reductions
_MAX_PARTS = 1024       # parts per segment at most (grid dimension 1 allows 65,535)
_BLOCK_R = 32    # rows per tile
_BLOCK_C = 32    # channels per program


@triton.jit
def _segment_part(OFFSETS, SPLITS):
    """(segment, rows [lo, hi) of this program's part) of the rows reductions, int64."""
    s = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    begin = tl.load(OFFSETS + s)
    length = tl.load(OFFSETS + s + 1) - begin
    return s, k, begin + length * k // SPLITS, begin + length * (k + 1) // SPLITS


@triton.jit
def _part_tile(ORDER, start, hi, cols, cin, C, HAS_ORDER: tl.constexpr, BLOCK_R: tl.constexpr):
    """(element offsets, row mask, element mask) of the BLOCK_R rows from ``start`` of a part ending at ``hi``."""
    rows = start + tl.arange(0, BLOCK_R)
    rin = rows < hi
    if HAS_ORDER:
        rows = tl.load(ORDER + rows, mask=rin, other=0)
    return rows[:, None] * C + cols[None, :], rin, rin[:, None] & cin[None, :]


@triton.jit
def _segment_moments_kernel(X, ORDER, OFFSETS, PART_N, PART_MEAN, PART_M2, C, SPLITS, HAS_ORDER: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    s, k, lo, hi = _segment_part(OFFSETS, SPLITS)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = cols < C
    acc_ty = PART_MEAN.dtype.element_ty
    n = tl.zeros((), acc_ty)
    mean = tl.zeros((BLOCK_C,), acc_ty)
    m2 = tl.zeros((BLOCK_C,), acc_ty)
    for start in range(lo, hi, BLOCK_R):
        off, rin, on = _part_tile(ORDER, start, hi, cols, cin, C, HAS_ORDER, BLOCK_R)
        x = tl.load(X + off, mask=on, other=0).to(acc_ty)
        cnt = tl.sum(rin.to(acc_ty), 0)
        tile_mean = tl.sum(x, 0) / tl.maximum(cnt, 1.0)
        dev = tl.where(on, x - tile_mean[None, :], 0.0)
        q = tl.sum(dev * dev, 0)
        total = n + cnt
        share = cnt / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean += delta * share
        m2 += q + delta * delta * n * share
        n = total
    part = s * SPLITS + k
    tl.store(PART_MEAN + part * C + cols, mean, mask=cin)
    tl.store(PART_M2 + part * C + cols, m2, mask=cin)
    tl.store(PART_N + part, n, mask=tl.program_id(2) == 0)


@triton.jit
def _segment_grad_moments_kernel(DY, X, ORDER, OFFSETS, CENTER, PART_A, PART_B, C, SPLITS, HAS_ORDER: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    s, k, lo, hi = _segment_part(OFFSETS, SPLITS)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = cols < C
    acc_ty = CENTER.dtype.element_ty
    mu = tl.load(CENTER + s * C + cols, mask=cin, other=0)
    a = tl.zeros((BLOCK_C,), acc_ty)
    b = tl.zeros((BLOCK_C,), acc_ty)
    for start in range(lo, hi, BLOCK_R):
        off, rin, on = _part_tile(ORDER, start, hi, cols, cin, C, HAS_ORDER, BLOCK_R)
        g = tl.load(DY + off, mask=on, other=0).to(acc_ty)
        x = tl.load(X + off, mask=on, other=0).to(acc_ty)
        a += tl.sum(g, 0)
        b += tl.sum(tl.where(on, g * (x - mu[None, :]), 0.0), 0)
    part = s * SPLITS + k
    tl.store(PART_A + part * C + cols, a, mask=cin)
    tl.store(PART_B + part * C + cols, b, mask=cin)


@triton.jit
def _row_tile(SEG, N, C, HAS_SEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(element offsets, table offsets, in-bounds mask) of this program's [BLOCK_R, BLOCK_C] tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rin = rows < N
    if HAS_SEG:
        seg = tl.load(SEG + rows, mask=rin, other=0)
    else:
        seg = tl.zeros((BLOCK_R,), tl.int64)
    on = rin[:, None] & (cols < C)[None, :]
    return rows[:, None] * C + cols[None, :], seg[:, None] * C + cols[None, :], on


@triton.jit
def _segment_scale_shift_kernel(X, SEG, CENTER, SCALE, SHIFT, Y, N, C, HAS_SEG: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    off, t, on = _row_tile(SEG, N, C, HAS_SEG, BLOCK_R, BLOCK_C)
    acc_ty = SCALE.dtype.element_ty
    x = tl.load(X + off, mask=on, other=0).to(acc_ty)
    y = (x - tl.load(CENTER + t, mask=on, other=0)) * tl.load(SCALE + t, mask=on, other=0) \
        + tl.load(SHIFT + t, mask=on, other=0)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=on)


@triton.jit
def _segment_norm_backward_kernel(DY, X, SEG, DY_SCALE, X_SCALE, CENTER, SHIFT, DX, N, C, HAS_SEG: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    off, t, on = _row_tile(SEG, N, C, HAS_SEG, BLOCK_R, BLOCK_C)
    acc_ty = CENTER.dtype.element_ty
    g = tl.load(DY + off, mask=on, other=0).to(acc_ty)
    x = tl.load(X + off, mask=on, other=0).to(acc_ty)
    dx = g * tl.load(DY_SCALE + t, mask=on, other=0) \
        + (x - tl.load(CENTER + t, mask=on, other=0)) * tl.load(X_SCALE + t, mask=on, other=0) \
        + tl.load(SHIFT + t, mask=on, other=0)
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=on)


def _grouping(segment: torch.Tensor | None, rows: int, num_segments: int, device: torch.device):
    """(order or None, offsets int64 [S + 1]): segment s is rows order[offsets[s]:offsets[s + 1]]."""
    if segment is None:  # [0, N, ..., N], built on the device (a host list would be a blocking copy)
        return None, torch.arange(num_segments + 1, device=device).clamp_max(1) * rows
    ids, order = torch.sort(segment, stable=True)
    return order, torch.searchsorted(ids, torch.arange(num_segments + 1, dtype=ids.dtype, device=device))


def _parts(rows: int, segments: int) -> int:
    """Parts per segment of the rows reductions: a function of the shape only (deterministic results)."""
    return max(1, min(_MAX_PARTS, rows // max(1, segments * _ROWS_PER_PART)))


def _reduction_grid(segments: int, parts: int, channels: int) -> tuple[int, int, int]:
    return (segments, parts, triton.cdiv(channels, _BLOCK_C))


def _elementwise_rows_grid(rows: int, channels: int) -> tuple[int, int]:
    return (triton.cdiv(rows, _BLOCK_R), triton.cdiv(channels, _BLOCK_C))


def segment_moments(x: torch.Tensor, segment: torch.Tensor | None,
                    num_segments: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, c = x.shape
    x = x.contiguous()
    acc = accumulation_dtype(x.dtype)
    order, offsets = _grouping(segment, rows, num_segments, x.device)
    parts = _parts(rows, num_segments)
    part_n = torch.zeros(num_segments, parts, 1, dtype=acc, device=x.device)
    part_mean = torch.zeros(num_segments, parts, c, dtype=acc, device=x.device)
    part_m2 = torch.zeros_like(part_mean)
    launch("sparse_norm", _segment_moments_kernel, _reduction_grid(num_segments, parts, c), x.device, x,
           offsets if order is None else order, offsets, part_n, part_mean, part_m2, c, parts,
           HAS_ORDER=order is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    count = (offsets[1:] - offsets[:-1]).to(acc)  # also right when C = 0 (no program stores a count)
    _, mean, m2 = merge_moments(part_n, part_mean, part_m2, 1)
    return count, mean[:, 0], m2[:, 0]


def segment_scale_shift(x: torch.Tensor, segment: torch.Tensor | None, center: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor) -> torch.Tensor:
    rows, c = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    launch("sparse_norm", _segment_scale_shift_kernel, _elementwise_rows_grid(rows, c), x.device, x,
           x if segment is None else segment.contiguous(), center.contiguous(), scale.contiguous(),
           shift.contiguous(), y, rows, c, HAS_SEG=segment is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    return y


def segment_grad_moments(dy: torch.Tensor, x: torch.Tensor, segment: torch.Tensor | None,
                         center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, c = x.shape
    num_segments = center.shape[0]
    order, offsets = _grouping(segment, rows, num_segments, x.device)
    parts = _parts(rows, num_segments)
    part_a = torch.zeros(num_segments, parts, c, dtype=center.dtype, device=x.device)
    part_b = torch.zeros_like(part_a)
    launch("sparse_norm", _segment_grad_moments_kernel, _reduction_grid(num_segments, parts, c), x.device,
           dy.contiguous(), x.contiguous(), offsets if order is None else order, offsets, center.contiguous(),
           part_a, part_b, c, parts, HAS_ORDER=order is not None, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    return part_a.sum(1), part_b.sum(1)


def segment_norm_backward(dy: torch.Tensor, x: torch.Tensor, segment: torch.Tensor | None, dy_scale: torch.Tensor,
                          x_scale: torch.Tensor, center: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    rows, c = x.shape
    x = x.contiguous()
    dx = torch.empty_like(x)
    launch("sparse_norm", _segment_norm_backward_kernel, _elementwise_rows_grid(rows, c), x.device,
           dy.contiguous(), x, x if segment is None else segment.contiguous(), dy_scale.contiguous(),
           x_scale.contiguous(), center.contiguous(), shift.contiguous(), dx, rows, c, HAS_SEG=segment is not None,
           BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    return dx
