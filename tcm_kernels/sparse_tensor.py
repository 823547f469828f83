"""Compact sparse layout: features [N, C] at integer coordinates [N, 1 + d] (batch, z, y, x).

Conversions to and from SparK's masked-dense layout, and to and from spconv's
``SparseConvTensor`` when spconv is installed. Rows are in ascending (batch, z, y, x)
order after :meth:`SparseTensor.from_dense`; the convolutions take rows in any order
(order only affects cache locality).

:meth:`SparseTensor.kernel_map` builds the :class:`KernelMap` of the coordinates once and
caches it on the tensor; :meth:`SparseTensor.replace_features` carries it along, so a stack
of submanifold convolutions (which keep coords and row order) builds it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class KernelMap(NamedTuple):
    """Neighbour lookup of a set of active sites, shared by every submanifold conv over them.

    grid: int32 [B, *S], the row of the active site at each position, -1 elsewhere (it also
        carries the geometry B and S).
    sites: int64 [N], the linear index into ``grid`` of each row, so ``grid.flatten()[sites] == arange(N)``.
    """

    grid: torch.Tensor
    sites: torch.Tensor

    @classmethod
    def from_coords(cls, coords: torch.Tensor, spatial_shape: tuple[int, ...], batch_size: int) -> KernelMap:
        """coords int [N, 1 + d] (batch, *spatial), unique and inside the grid -> the map (any device, any row order).

        Validates the coordinates (range, uniqueness): a host sync, which is why the map is built
        once per set of sites and cached (:meth:`SparseTensor.kernel_map`).
        """
        op = "KernelMap.from_coords"
        shape = (int(batch_size), *(int(s) for s in spatial_shape))
        if coords.dim() != 2 or coords.shape[1] != len(shape):
            raise ValueError(f"{op}: coords must be [N, {len(shape)}], got shape {tuple(coords.shape)}")
        c = coords.long()
        n = c.shape[0]
        if n and (bool((c < 0).any()) or bool((c >= torch.tensor(shape, device=c.device)).any())):
            raise ValueError(f"{op}: coords must lie in [0, {shape}) (batch, *spatial_shape), got values outside")
        sites = c[:, 0]
        for axis in range(1, len(shape)):
            sites = sites * shape[axis] + c[:, axis]
        kmap = cls.from_sites(sites, shape)
        if n and int((kmap.grid >= 0).sum()) != n:
            raise ValueError(f"{op}: coords must be unique, got {n - int((kmap.grid >= 0).sum())} duplicate rows")
        return kmap

    @classmethod
    def from_sites(cls, sites: torch.Tensor, shape: tuple[int, ...]) -> KernelMap:
        """sites int64 [N], linear indices into a grid of ``shape`` = (B, *S) -> the map, without checks.

        The caller guarantees that the sites are unique and in range (no host sync); use
        :meth:`from_coords` for coordinates that come from outside.
        """
        grid = torch.full(shape, -1, dtype=torch.int32, device=sites.device)
        grid.view(-1)[sites] = torch.arange(sites.shape[0], dtype=torch.int32, device=sites.device)
        return cls(grid, sites)


@dataclass
class SparseTensor:
    """features [N, C] (float), coords int32 [N, 1 + d] = (batch, *spatial), spatial_shape (d ints), batch_size."""

    features: torch.Tensor
    coords: torch.Tensor
    spatial_shape: tuple[int, ...]
    batch_size: int

    def __post_init__(self) -> None:
        op = "SparseTensor"
        self.spatial_shape = tuple(int(s) for s in self.spatial_shape)
        d = len(self.spatial_shape)
        if d not in (2, 3):
            raise ValueError(f"{op}: spatial_shape must have 2 or 3 entries, got {self.spatial_shape}")
        if self.features.dim() != 2:
            raise ValueError(f"{op}: features must be 2-D [N, C], got shape {tuple(self.features.shape)}")
        if self.coords.dim() != 2 or self.coords.shape != (self.features.shape[0], 1 + d):
            raise ValueError(f"{op}: coords must be [N={self.features.shape[0]}, {1 + d}], got shape "
                             f"{tuple(self.coords.shape)}")
        if self.coords.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: coords must be int32 or int64, got {self.coords.dtype}")
        self._kernel_map: KernelMap | None = None  # built on first use, see kernel_map()

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    @classmethod
    def from_dense(cls, x: torch.Tensor, mask: torch.Tensor) -> SparseTensor:
        """x [B, C, *S], mask bool [B, 1, *S] -> rows at the active sites (a host sync: N is data-dependent)."""
        if mask.dtype != torch.bool or mask.dim() != x.dim() or mask.shape[1] != 1:
            raise ValueError(f"SparseTensor.from_dense: mask must be bool [B, 1, *S], got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        coords = mask[:, 0].nonzero().to(torch.int32)
        features = x.movedim(1, -1)[mask[:, 0]]
        return cls(features, coords, tuple(x.shape[2:]), x.shape[0])

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x [B, C, *S] with zeros at inactive sites, mask bool [B, 1, *S])."""
        b, s, c = self.batch_size, self.spatial_shape, self.features.shape[1]
        idx = tuple(self.coords.long().unbind(1))
        x = self.features.new_zeros((b, *s, c))
        x = x.index_put(idx, self.features)
        mask = torch.zeros((b, *s), dtype=torch.bool, device=self.features.device)
        mask[idx] = True
        return x.movedim(-1, 1), mask.unsqueeze(1)

    def replace_features(self, features: torch.Tensor) -> SparseTensor:
        """The same sites (coords, row order, cached kernel map) with new features [N, C']."""
        out = SparseTensor(features, self.coords, self.spatial_shape, self.batch_size)
        out._kernel_map = self._kernel_map
        return out

    def with_kernel_map(self, kernel_map: KernelMap) -> SparseTensor:
        """This tensor with ``kernel_map`` cached: a map the caller built for exactly these coords (unchecked)."""
        self._kernel_map = kernel_map
        return self

    def coarsen(self, stride: int) -> tuple[SparseTensor, torch.Tensor]:
        """The sites of a stride-``stride`` layer: (coarse, inverse).

        ``coarse``: the sites ``coords // stride`` with at least one active child on the grid
        ``spatial_shape // stride``, in ascending (batch, *spatial) order, features ``[N_out, 0]``, its
        kernel map attached (built from the sorted unique sites: no validation, no host sync).
        ``inverse``: int64 [N], the coarse row of each row of this tensor. ``stride`` must divide every
        spatial size (callers check).
        """
        coarse_shape = tuple(s // stride for s in self.spatial_shape)
        coords = self.coords.long()
        key = coords[:, 0]
        for axis, size in enumerate(coarse_shape):
            key = key * size + coords[:, 1 + axis] // stride
        sites, inverse = torch.unique(key, sorted=True, return_inverse=True)
        out_coords = torch.empty((sites.shape[0], 1 + self.ndim), dtype=torch.int32, device=coords.device)
        rest = sites
        for axis in reversed(range(self.ndim)):
            out_coords[:, 1 + axis] = rest % coarse_shape[axis]
            rest = rest // coarse_shape[axis]
        out_coords[:, 0] = rest
        coarse = SparseTensor(self.features.new_empty((sites.shape[0], 0)), out_coords, coarse_shape, self.batch_size)
        return coarse.with_kernel_map(KernelMap.from_sites(sites, (self.batch_size, *coarse_shape))), inverse

    def kernel_map(self) -> KernelMap:
        """The :class:`KernelMap` of ``coords`` (built on the first call, then cached on this tensor)."""
        if self._kernel_map is None:
            self._kernel_map = KernelMap.from_coords(self.coords, self.spatial_shape, self.batch_size)
        return self._kernel_map

    def to_spconv(self):
        """-> ``spconv.pytorch.SparseConvTensor`` (int32 indices (batch, z, y, x), the same rows)."""
        import spconv.pytorch as spconv  # optional dependency (extra "bench")

        return spconv.SparseConvTensor(self.features, self.coords.to(torch.int32).contiguous(),
                                       list(self.spatial_shape), self.batch_size)

    @classmethod
    def from_spconv(cls, st) -> SparseTensor:
        """From a ``spconv.pytorch.SparseConvTensor``; rows keep spconv's order."""
        return cls(st.features, st.indices.to(torch.int32), tuple(int(v) for v in st.spatial_shape), int(st.batch_size))


def weight_to_spconv(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch conv weight [Cout, Cin/g, *k] -> spconv 2.x layout [Cout, *k, Cin/g]."""
    return weight.movedim(1, -1).contiguous()


def weight_from_spconv(weight: torch.Tensor) -> torch.Tensor:
    """spconv 2.x weight [Cout, *k, Cin/g] -> PyTorch layout [Cout, Cin/g, *k]."""
    return weight.movedim(-1, 1).contiguous()
