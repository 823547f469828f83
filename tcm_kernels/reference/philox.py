"""Philox-4x32-10 and the portable log in plain PyTorch: the oracle for the RNG recipe.

uint32 values live in int64 tensors; products are split into 16-bit halves so no
intermediate leaves the int64 range.
"""

from __future__ import annotations

import torch

_U32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t = a * b_lo
    hi = (a * b_hi + (t >> 16)) >> 16
    lo = ((((a * b_hi) & 0xFFFF) << 16) + t) & _U32
    return hi, lo


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counter words c0..c3 (int64 tensors of uint32 values, broadcastable), key (k0, k1)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], c0)
        hi1, lo1 = _mulhilo(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _U32, (k1 + _WEYL[1]) & _U32
    return c0, c1, c2, c3


def patch_words(seed: int, offset: int, rows: torch.Tensor, patches: torch.Tensor):
    """Philox words for counter (patch, row, offset_lo, offset_hi) and key (seed_lo, seed_hi)."""
    zero = torch.zeros((), dtype=torch.int64)
    return philox4x32_10(patches, rows, zero + (offset & _U32), zero + (offset >> 32),
                         seed & _U32, (seed >> 32) & _U32)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def log_portable(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive finite float32 values with the exact rounding sequence of
    csrc/sample_mask/sample_mask.h (one torch op per IEEE operation, so nothing is fused)."""
    x = x.to(torch.float32)
    subnormal = (x.view(torch.int32) >> 23) == 0
    x = torch.where(subnormal, x * _f32(8388608.0), x)
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127 - torch.where(subnormal, 23, 0).to(torch.int32)
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    big = m > _f32(1.41421353816986083984375)
    m = torch.where(big, m * _f32(0.5), m)
    e = e + big.to(torch.int32)
    z = (m - 1.0) / (m + 1.0)
    w = z * z
    p = torch.full_like(w, 0.0909090936183929443359375)
    for c in (0.111111111938953399658203125, 0.14285714924335479736328125, 0.2000000029802322387695312,
              0.3333333432674407958984375, 1.0):
        p = p * w
        p = p + _f32(c)
    log_m = (z * 2.0) * p
    return e.to(torch.float32) * _f32(0.693147182464599609375) + log_m


def ordered_bits(f: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) with the order of the float32 values; -0.0 maps like +0.0."""
    b = f.to(torch.float32).view(torch.int32).to(torch.int64) & _U32
    b = torch.where(b == 0x80000000, 0, b)
    return torch.where((b & 0x80000000) != 0, (~b) & _U32, b | 0x80000000)


def uniform_open(word: torch.Tensor) -> torch.Tensor:
    """(2 * (word >> 9) + 1) * 2^-24 in float32: exact, in (0, 1)."""
    return (2 * (word >> 9) + 1).to(torch.float32) * _f32(5.9604644775390625e-08)
