"""Tiles of a patch-aligned mask: the geometry of the (experimental) patch-block convolution path.

When the mask is aligned to p^d patches, every active patch is a dense tile, and a site's
neighbours lie in its own tile or in the halo of width r = dilation * (k - 1) / 2 around it.
These helpers list the active patches and cut the tiles (with or without halo) out of strided
views of the masked-dense tensors; the torch and Triton back ends of the path share them.
"""

from __future__ import annotations

import torch

from .geometry import blocked_shape


def active_patches(mask: torch.Tensor, patch: int, op: str = "submanifold_conv") -> tuple[torch.Tensor, ...]:
    """Indices (b, g_1, ..., g_d) of the active patches of mask [B, 1, *S], T each (int64).

    Raises ValueError (naming ``op``) when ``patch`` does not divide S or a patch is partly active.
    """
    spatial = tuple(mask.shape[2:])
    if any(s % patch for s in spatial):
        raise ValueError(f"{op}: patch_size {patch} must divide the spatial shape {spatial}")
    nd = len(spatial)
    blocks = mask.reshape(mask.shape[0], *blocked_shape(spatial, patch))
    inner = tuple(range(2, 2 + 2 * nd, 2))
    coarse = blocks.any(dim=inner)
    if not torch.equal(coarse, blocks.all(dim=inner)):
        raise ValueError(f"{op}: mask must be aligned to patches of size {patch} (patch_size hint), "
                         "got a mask that is not")
    return coarse.nonzero(as_tuple=True)


def padded_channels_last(t: torch.Tensor, mask: torch.Tensor, pad: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[B, *(S + 2r), C] in ``dtype``: ``t * mask`` channels last with a zero border of width r (one pass)."""
    batch, channels, *spatial = t.shape
    out = t.new_empty((batch, *(s + 2 * r for s, r in zip(spatial, pad)), channels), dtype=dtype)
    for dim, (s, r) in enumerate(zip(spatial, pad)):
        if r:
            out.narrow(1 + dim, 0, r).zero_()
            out.narrow(1 + dim, s + r, r).zero_()
    interior = out[(slice(None), *(slice(r, r + s) for s, r in zip(spatial, pad)))]
    torch.mul(t.movedim(1, -1), mask.movedim(1, -1), out=interior)
    return out


def gather_tiles(padded: torch.Tensor, patches: tuple[torch.Tensor, ...], patch: int, pad: list[int]) -> torch.Tensor:
    """Tiles with halo [T, C, *(p + 2r)] (channels-last strides) of padded [B, *(S + 2r), C]."""
    nd = len(pad)
    view = padded
    for dim, r in enumerate(pad):
        view = view.unfold(1 + dim, patch + 2 * r, patch)  # [B, *G, C, *(p + 2r)]
    tiles = view.movedim(1 + nd, -1)[patches]  # [T, *(p + 2r), C], one contiguous copy
    return tiles.movedim(-1, 1)


def patch_view(dense: torch.Tensor, patch: int) -> torch.Tensor:
    """View [B, *G, C, *p] of a contiguous dense [B, C, *S] (G = S / p)."""
    batch, channels, *spatial = dense.shape
    nd = len(spatial)
    split = dense.view(batch, channels, *blocked_shape(spatial, patch))
    return split.permute(0, *range(2, 2 + 2 * nd, 2), 1, *range(3, 3 + 2 * nd, 2))


def centre_tiles(t: torch.Tensor, patches: tuple[torch.Tensor, ...], patch: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, C, *p] in ``dtype``: the active patches of dense t [B, C, *S] (no halo)."""
    return patch_view(t.contiguous(), patch)[patches].to(dtype)
