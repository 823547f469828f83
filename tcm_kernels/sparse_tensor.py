"""Compact sparse layout: features [N, C] at integer coordinates [N, 1 + d] (batch, z, y, x).

Conversions to and from SparK's masked-dense layout, and to and from spconv's
``SparseConvTensor`` when spconv is installed. Rows are in ascending (batch, z, y, x)
order after :meth:`SparseTensor.from_dense`, the order the compiled engine uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        return SparseTensor(features, self.coords, self.spatial_shape, self.batch_size)

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
