"""Counting rules of ``sample_mask`` shared by its reference, Triton and compiled back ends."""

from __future__ import annotations

import math

# Longest row the Triton kernel holds in one register tile (BLOCK = next_pow2(N)); the dispatch sends longer
# CUDA rows to the CUDA kernel.
TRITON_MAX_PATCHES = 16384


def hardest_budget(num_masked: int, hard_fraction: float) -> int:
    """Patches the "hardest" strategy masks by score rank: round(hard_fraction * M), clamped to [0, M]."""
    return min(max(math.floor(hard_fraction * num_masked + 0.5), 0), num_masked)
