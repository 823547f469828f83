"""Modules of tcm_kernels: sparse normalizations (SubMConv and SparseTensor come with the sparse-conv work)."""

from .sparse_norm import (SparseBatchNorm2d, SparseBatchNorm3d, SparseGroupNorm, SparseInstanceNorm2d,
                          SparseInstanceNorm3d, SparseLayerNorm, SparseSyncBatchNorm)

__all__ = ["SparseBatchNorm2d", "SparseBatchNorm3d", "SparseGroupNorm", "SparseInstanceNorm2d",
           "SparseInstanceNorm3d", "SparseLayerNorm", "SparseSyncBatchNorm"]
