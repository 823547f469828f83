"""Triton back end of :func:`tcm_kernels.sample_mask`.

Grid and tiles
--------------
One program per row of ``scores`` [B, N]; the whole row lives in one register tile of
``BLOCK = next_pow2(N)`` lanes (at least 16), so N is limited to ``MAX_PATCHES`` = 16384
(a 128^2 patch grid, or 32 x 32 x 16 in 3D; MIM grids are 196 to 4096). Larger rows raise
a ``ValueError`` that names the limit; by default :func:`tcm_kernels.sample_mask` sends them to the
CUDA kernel, which has no such limit.

Per row:

1. keys: Philox-4x32-10 words of counter (patch, row, offset_lo, offset_hi) and key
   (seed_lo, seed_hi), turned into the strategy's 64-bit key exactly as
   ``csrc/sample_mask/sample_mask.h`` does (the recipe is in the docstring of
   :mod:`tcm_kernels.ops.sample_mask`);
2. selection: the k smallest ``(key, patch)`` pairs by an MSB-first radix select, one
   key bit per step: count the candidates whose next bit is 0 (``tl.sum``), go to the
   half that holds the k-th smallest. After the last bit the threshold key is known;
   lanes below it are selected, and lanes equal to it are taken in patch order
   (``tl.cumsum``) until k are selected. No sort, no data-dependent control flow;
3. outputs: ``visible``, and ``ids_keep`` / ``ids_restore`` from one exclusive prefix sum
   of ``visible`` (the kept patches before each lane give its slot).

Bit-identity with the CPU and CUDA back ends
--------------------------------------------
* The portable log uses only +, -, *, and a correctly rounded division
  (``tl.math.div_rn``: Triton lowers ``/`` on fp32 to the approximate ``div.full.f32``),
  and the kernel is launched with ``enable_fp_fusion=False`` so no mul+add becomes an FMA.
* Scalars travel as integers: seed and offset as 32-bit words, fp32 parameters
  (1/temperature, roi_threshold) as their bit patterns, and ``roi_mask_ratio`` as its
  float64 bit pattern, because a Python float argument is rounded to fp32 by the
  interpreter. The stratified budget is computed in float64 like the C++ header.
* A subnormal input of the log is rescaled with integer operations (exact), so flushing
  subnormals to zero on a GPU cannot change a key.

Performance notes (GPU): a 64-bit key costs 64 block reductions per selection (32 for
the 32-bit keys of ``uniform``, ``stratified`` and ``hardest``); rows are independent
programs, so B >= the number of SMs keeps the GPU busy. ptxas (sm_90) reports no spills
up to BLOCK = 4096 (8 warps, 106 registers for ``uniform``, 160 for ``weighted``); at
BLOCK = 16384 (16 warps, capped at 128 registers) ``weighted`` spills about 2 KB per
thread. The CUDA kernel (8-bit radix passes over keys in shared memory) is the better
choice for long rows.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import triton
import triton.language as tl

from .._core.sampling import TRITON_MAX_PATCHES as MAX_PATCHES, hardest_budget
from ._launch import launch
from .philox import philox4x32_10

STRATEGY_IDS = {"uniform": 0, "weighted": 1, "stratified": 2, "hardest": 3}

UNIFORM = tl.constexpr(0)
WEIGHTED = tl.constexpr(1)
STRATIFIED = tl.constexpr(2)
HARDEST = tl.constexpr(3)

# float32 constants of log_portable (csrc/sample_mask/sample_mask.h), written exactly.
SQRT2_F32 = tl.constexpr(1.41421353816986083984375)
LN2_F32 = tl.constexpr(0.693147182464599609375)
INV_11 = tl.constexpr(0.0909090936183929443359375)
INV_9 = tl.constexpr(0.111111111938953399658203125)
INV_7 = tl.constexpr(0.14285714924335479736328125)
INV_5 = tl.constexpr(0.2000000029802322387695312)
INV_3 = tl.constexpr(0.3333333432674407958984375)
TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def _log_portable(x):
    """Natural log of positive finite fp32 x with the exact rounding sequence of log_portable (C++).

    x = m 2^e with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(z) = 2 z (1 + w/3 + w^2/5 + ... + w^5/11),
    z = (m - 1) / (m + 1), w = z^2, evaluated by Horner's rule.
    """
    bits = x.to(tl.uint32, bitcast=True)
    subnormal = (bits >> 23) == 0
    # For a subnormal x the C++ code takes x * 2^23 (exact). The bits of that product equal
    # those of float(mantissa) = x * 2^149 lowered by 126 in the exponent field: integers only.
    rescaled = bits.to(tl.float32).to(tl.uint32, bitcast=True) - (126 << 23)
    bits = tl.where(subnormal, rescaled, bits)
    e = (bits >> 23).to(tl.int32) - 127 - tl.where(subnormal, 23, 0)
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > SQRT2_F32
    m = tl.where(big, m * 0.5, m)
    e = e + big.to(tl.int32)
    z = tl.math.div_rn(m - 1.0, m + 1.0)
    w = z * z
    p = w * INV_11 + INV_9
    p = p * w + INV_7
    p = p * w + INV_5
    p = p * w + INV_3
    p = p * w + 1.0
    log_m = (z * 2.0) * p
    return e.to(tl.float32) * LN2_F32 + log_m


@triton.jit
def _ordered_bits(f):
    """uint32 with the order of the fp32 values f (-0.0 maps like +0.0)."""
    b = f.to(tl.uint32, bitcast=True)
    b = tl.where(b == 0x80000000, tl.zeros_like(b), b)
    return tl.where((b & 0x80000000) != 0, ~b, b | 0x80000000)


@triton.jit
def _weighted_key(scores, inv_temperature, w0, w1):
    """Efraimidis-Spirakis key ordered_bits(log E - log(score) / T) << 32 | w1; +inf for score 0."""
    positive = scores > 0.0
    safe = tl.where(positive, scores, 1.0)
    u = ((w0 >> 9) * 2 + 1).to(tl.float32) * TWO_POW_M24  # exact, in (0, 1)
    expo = -_log_portable(u)  # an Exp(1) draw
    f = _log_portable(expo) - _log_portable(safe) * inv_temperature
    hi = tl.where(positive, _ordered_bits(f), tl.full(f.shape, 0xFFFFFFFF, tl.uint32))
    return (hi.to(tl.uint64) << 32) | w1.to(tl.uint64)


@triton.jit
def _mask_smallest(keys, active, k, KEY_BITS: tl.constexpr):
    """The k smallest (key, lane) among the active lanes, as a bool tile.

    keys: uint64 tile whose bits above KEY_BITS are 0; k in [0, number of active lanes].
    Radix select, MSB first: ``threshold`` collects the bits of the k-th smallest key and
    ``rank`` is its rank among the candidates that still share those leading bits.
    """
    threshold = tl.zeros((), tl.uint64)
    rank = k
    candidate = active
    bit = tl.full((), 1 << (KEY_BITS - 1), tl.uint64)
    for _ in range(KEY_BITS):
        bit_is_one = (keys & bit) != 0
        zeros = tl.sum((candidate & ~bit_is_one).to(tl.int32), axis=0)
        take_one = zeros < rank  # the k-th smallest has this bit set
        threshold = tl.where(take_one, threshold | bit, threshold)
        rank = tl.where(take_one, rank - zeros, rank)
        candidate = candidate & (bit_is_one == take_one)
        bit = bit >> 1
    # candidate == active & (keys == threshold): the tie lanes, taken lowest lane first.
    tie_order = tl.cumsum(candidate.to(tl.int32), axis=0)
    return (active & (keys < threshold)) | (candidate & (tie_order <= rank))


@triton.jit
def _sample_mask_kernel(
    scores_ptr,  # fp32 [B, N], contiguous
    visible_ptr,  # uint8 [B, N] out (the bool output's bytes): 1 = kept
    ids_keep_ptr,  # int64 [B, N - M] out: kept patches, ascending
    ids_restore_ptr,  # int64 [B, N] out: slot of each patch in cat(kept, masked)
    n: tl.int64,  # N, patches per row
    num_masked: tl.int64,  # M, masked per row
    seed_lo: tl.int64, seed_hi: tl.int64,  # Philox key words
    offset_lo: tl.int64, offset_hi: tl.int64,  # Philox counter words 2 and 3
    inv_temperature_bits: tl.int64,  # fp32 bits of 1 / temperature (weighted)
    roi_threshold_bits: tl.int64,  # fp32 bits of roi_threshold (stratified)
    roi_mask_ratio_bits: tl.int64,  # fp64 bits of roi_mask_ratio (stratified)
    num_hard: tl.int64,  # H = hardest_budget(M, hard_fraction) (hardest)
    STRATEGY: tl.constexpr,  # UNIFORM | WEIGHTED | STRATIFIED | HARDEST
    BLOCK: tl.constexpr,  # next_pow2(N): one tile holds the row
):
    row = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    in_row = lane < n
    row_start = row.to(tl.int64) * n
    scores = tl.load(scores_ptr + row_start + lane, mask=in_row, other=0.0)

    patch = lane.to(tl.uint32)
    zero = tl.zeros_like(patch)
    w0, w1, _, _ = philox4x32_10(patch, zero + row.to(tl.uint32), zero + offset_lo.to(tl.uint32),
                                 zero + offset_hi.to(tl.uint32), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    m = num_masked.to(tl.int32)

    if STRATEGY == UNIFORM:
        masked = _mask_smallest(w0.to(tl.uint64), in_row, m, KEY_BITS=32)
    elif STRATEGY == WEIGHTED:
        inv_temperature = inv_temperature_bits.to(tl.uint32).to(tl.float32, bitcast=True)
        keys = _weighted_key(scores, inv_temperature, w0, w1)
        masked = _mask_smallest(keys, in_row, m, KEY_BITS=64)
    elif STRATEGY == STRATIFIED:
        roi_threshold = roi_threshold_bits.to(tl.uint32).to(tl.float32, bitcast=True)
        roi = in_row & (scores >= roi_threshold)
        background = in_row & (scores < roi_threshold)
        n_roi = tl.sum(roi.to(tl.int32), axis=0)
        # stratified_roi_budget: round(ratio * |ROI|) in float64, clamped so both strata fit.
        ratio = roi_mask_ratio_bits.to(tl.int64).to(tl.float64, bitcast=True)
        want = (ratio * n_roi.to(tl.float64) + 0.5).to(tl.int32)
        low = tl.maximum(m - (n.to(tl.int32) - n_roi), 0)
        m_roi = tl.minimum(tl.maximum(want, low), tl.minimum(m, n_roi))
        keys = w0.to(tl.uint64)
        masked = _mask_smallest(keys, roi, m_roi, KEY_BITS=32) | _mask_smallest(keys, background, m - m_roi,
                                                                               KEY_BITS=32)
    else:  # HARDEST: the H highest scores (key ~ordered_bits), then uniform among the rest
        h = num_hard.to(tl.int32)
        hard = _mask_smallest((~_ordered_bits(scores)).to(tl.uint64), in_row, h, KEY_BITS=32)
        masked = hard | _mask_smallest(w0.to(tl.uint64), in_row & ~hard, m - h, KEY_BITS=32)

    visible = in_row & ~masked
    vis = visible.to(tl.int32)
    kept_before = tl.cumsum(vis, axis=0) - vis
    masked_before = lane - kept_before
    n_keep = n - num_masked
    restore = tl.where(visible, kept_before.to(tl.int64), n_keep + masked_before)
    tl.store(visible_ptr + row_start + lane, vis.to(tl.uint8), mask=in_row)
    tl.store(ids_keep_ptr + row.to(tl.int64) * n_keep + kept_before, lane.to(tl.int64), mask=visible)
    tl.store(ids_restore_ptr + row_start + lane, restore, mask=in_row)


def _f32_bits(x: float) -> int:
    """Bit pattern of float32(x), rounded to nearest like static_cast<float>(double) (inf on overflow)."""
    with np.errstate(over="ignore"):
        return int(np.array(x, dtype=np.float32).view(np.uint32))


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def sample_mask_triton(scores: torch.Tensor, num_masked: int, strategy: str, seed: int, offset: int,
                       temperature: float, roi_threshold: float, roi_mask_ratio: float,
                       hard_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.tcm.sample_mask``.

    scores: fp32 [B, N] (N <= MAX_PATCHES) on a CUDA device (or CPU with TRITON_INTERPRET=1).
    Returns (visible bool [B, N], ids_keep int64 [B, N - M], ids_restore int64 [B, N]), M = num_masked.
    """
    op = "sample_mask"
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"{op}: the Triton kernel takes fp32 scores [B, N], got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if strategy not in STRATEGY_IDS:
        raise ValueError(f"{op}: strategy must be one of {tuple(STRATEGY_IDS)}, got {strategy!r}")
    b, n = scores.shape
    if n > MAX_PATCHES:
        raise ValueError(f"{op}: the Triton kernel holds a row in one tile, so N must be <= {MAX_PATCHES}, "
                         f"got N={n}; use backend='cuda' for longer rows")
    if not 0 <= num_masked <= n:
        raise ValueError(f"{op}: num_masked must be in [0, {n}], got {num_masked}")
    if not (0 <= seed < 2**63 and 0 <= offset < 2**63):
        raise ValueError(f"{op}: seed and offset must be in [0, 2^63), got {seed} and {offset}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    scores = scores.contiguous()
    visible = torch.empty((b, n), dtype=torch.bool, device=scores.device)
    ids_keep = torch.empty((b, n - num_masked), dtype=torch.int64, device=scores.device)
    ids_restore = torch.empty((b, n), dtype=torch.int64, device=scores.device)
    if b == 0 or n == 0:
        return visible, ids_keep, ids_restore
    block = max(triton.next_power_of_2(n), 16)
    launch(op, _sample_mask_kernel, (b,), scores.device,
           scores, visible.view(torch.uint8), ids_keep, ids_restore,
           n, num_masked,
           seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF, offset >> 32,
           _f32_bits(1.0 / temperature), _f32_bits(roi_threshold), _f64_bits(roi_mask_ratio),
           hardest_budget(num_masked, hard_fraction),
           STRATEGY=STRATEGY_IDS[strategy], BLOCK=block,
           num_warps=_num_warps(block), enable_fp_fusion=False)
    return visible, ids_keep, ids_restore
