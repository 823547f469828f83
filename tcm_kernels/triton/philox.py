"""Philox-4x32-10 in Triton: the same generator as csrc/common/philox.h, bit for bit.

Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11). Ten rounds of

    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))
    (k0, k1)         <- (k0 + W0, k1 + W1)                     (all mod 2^32)

``lo`` is the wrapping uint32 product and ``hi`` its upper half (``tl.umulhi``).
Every operand is uint32, so the interpreter (numpy) and the GPU agree exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Counter words c0..c3 (uint32 tensors of one shape), key k0, k1 (uint32) -> four uint32 words."""
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _philox_rows_kernel(counters_ptr,  # int64 [K, 4], each a uint32 counter word
                        words_ptr,  # int64 [K, 4] out: the four random words
                        num_counters,  # K
                        seed_lo: tl.int64,  # key word 0 (low 32 bits of the seed)
                        seed_hi: tl.int64,  # key word 1
                        BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < num_counters
    base = counters_ptr + rows.to(tl.int64) * 4
    c0 = tl.load(base + 0, mask=live, other=0).to(tl.uint32)
    c1 = tl.load(base + 1, mask=live, other=0).to(tl.uint32)
    c2 = tl.load(base + 2, mask=live, other=0).to(tl.uint32)
    c3 = tl.load(base + 3, mask=live, other=0).to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    out = words_ptr + rows.to(tl.int64) * 4
    # uint32 -> int64 zero-extends, so the words land in [0, 2^32) like the C++ op's.
    tl.store(out + 0, r0.to(tl.int64), mask=live)
    tl.store(out + 1, r1.to(tl.int64), mask=live)
    tl.store(out + 2, r2.to(tl.int64), mask=live)
    tl.store(out + 3, r3.to(tl.int64), mask=live)


def philox4x32_10_triton(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Triton twin of ``torch.ops.tcm.philox4x32_10``: counters int64 [K, 4] -> words int64 [K, 4].

    Key = (seed mod 2^32, seed >> 32). Used for known-answer tests of the generator.
    """
    if counters.dim() != 2 or counters.shape[1] != 4 or counters.dtype != torch.int64:
        raise ValueError(f"philox4x32_10: counters must be int64 [K, 4], got {counters.dtype} "
                         f"{tuple(counters.shape)}")
    counters = counters.contiguous()
    words = torch.empty_like(counters)
    block = 128
    launch("philox4x32_10", _philox_rows_kernel, (triton.cdiv(counters.shape[0], block),), counters.device,
           counters, words, counters.shape[0], seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, BLOCK=block)
    return words
