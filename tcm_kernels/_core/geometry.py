"""Kernel and grid geometry: pure shape arithmetic on tensors, shared by every back end."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def blocked_shape(spatial: Sequence[int], block: int | Sequence[int]) -> list[int]:
    """[S_1 / p_1, p_1, S_2 / p_2, p_2, ...]: the shape that splits every spatial dim into (blocks, block).

    ``block`` is one int for every dim or one per dim; it must divide each size (callers check).
    Reshaping [B, C, *S] to [B, C, *blocked_shape(S, p)] puts block index g_i at dim 2 + 2i and the
    offset inside the block at dim 3 + 2i.
    """
    sizes = [block] * len(spatial) if isinstance(block, int) else list(block)
    return [v for s, p in zip(spatial, sizes) for v in (s // p, p)]


def space_to_depth(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, C, *S] -> [B, C * s^d, *(S / s)], channel c * s^d + (row-major offset in the s^d window).

    The channel order of ``weight.reshape(Cout, Cin * s^d)`` for a [Cout, Cin, s, ..., s] kernel, so a
    conv with kernel = stride = s equals a 1x1 conv of this (pixel_unshuffle for any d).
    """
    b, c, *spatial = x.shape
    nd = len(spatial)
    window_dims = [3 + 2 * i for i in range(nd)]
    coarse_dims = [2 + 2 * i for i in range(nd)]
    return (x.reshape(b, c, *blocked_shape(spatial, stride)).permute(0, 1, *window_dims, *coarse_dims)
            .reshape(b, c * stride**nd, *(size // stride for size in spatial)))


def transposed_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[Cout, Cin/g, *k] -> [Cin, Cout/g, *k] flipped: the kernel whose submanifold conv of grad_out is grad_x.

    The neighbour relation of a submanifold conv is symmetric, so the input gradient is the same
    conv run on ``grad_out`` with this kernel (no atomics, no scatter).
    """
    cout, cin_g, *k = weight.shape
    nd = len(k)
    w = weight.reshape(groups, cout // groups, cin_g, *k).transpose(1, 2).reshape(cin_g * groups, cout // groups, *k)
    return w.flip(dims=tuple(range(2, 2 + nd)))


def halo(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Halo width r = dilation * (k - 1) / 2 per spatial dim ("same" padding of an odd kernel)."""
    return [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
