"""The norm engine's CPU loops give the same bits in every lane of every ISA clone.

The hot loops of csrc/sparse_norm/segment_norm_cpu.cpp are compiled as AVX-512 / AVX2 / baseline
clones (csrc/common/cpu_dispatch.h) chosen at load time; within one clone a row's channels run
through the widest vector body, then narrower vectors, then scalar code. The clones agree bit for
bit exactly when vector and scalar code round every channel identically (no FMA contraction, no
reassociation). Only the clone of this machine's CPU can run here, so the test checks that property
inside it: a channel's results do not change when a roll of the channels moves it from the vector
body to the scalar tail (C = 37: 32 vector lanes + 5 scalar for fp32 under AVX-512).
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels  # noqa: F401  (loads the compiled tcm:: ops)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32 if t.dtype == torch.float32 else torch.int16)


def _primitives(x, dy, seg, num_segments, table):
    """Every output of the four tcm::segment_* CPU ops, channels last."""
    count, mean, m2 = torch.ops.tcm.segment_moments(x, seg, num_segments)
    y = torch.ops.tcm.segment_scale_shift(x, seg, mean, table, m2)
    sum_dy, sum_dy_xc = torch.ops.tcm.segment_grad_moments(dy, x, seg, mean)
    dx = torch.ops.tcm.segment_norm_backward(dy, x, seg, table, m2, mean, sum_dy)
    return mean, m2, y, sum_dy, sum_dy_xc, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [37, 70])
@pytest.mark.parametrize("num_segments", [1, 3])
def test_lane_position_does_not_change_bits(dtype, channels, num_segments):
    g = torch.Generator().manual_seed(channels + num_segments)
    n = 300  # several chunks of rows at these widths (8192 elements per chunk)
    x = (torch.randn(n, channels, generator=g) * 3 + 2).to(dtype)
    dy = torch.randn(n, channels, generator=g).to(dtype)
    seg = None if num_segments == 1 else torch.randint(0, num_segments, (n,), generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    table = (torch.rand(num_segments, channels, generator=g) + 0.5).to(acc)
    want = _primitives(x, dy, seg, num_segments, table)
    for shift in (5, 13, channels - 1):  # the tail channels land in the vector body and back
        got = _primitives(x.roll(shift, 1).contiguous(), dy.roll(shift, 1).contiguous(), seg, num_segments,
                          table.roll(shift, 1).contiguous())
        for name, w, o in zip(("mean", "m2", "y", "sum_dy", "sum_dy_xc", "dx"), want, got):
            assert torch.equal(_bits(o.roll(-shift, 1)), _bits(w)), f"{name} differs after a roll by {shift}"
