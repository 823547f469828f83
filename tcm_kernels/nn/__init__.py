"""Modules of tcm_kernels: submanifold convolution, sparse downsampling and sparse normalizations.

Every module takes masked-dense (x [B, C, *S], mask bool [B, 1, *S]) or a compact
:class:`tcm_kernels.SparseTensor` and returns the same layout.
"""

from .sparse_conv import SparseDownsample2d, SparseDownsample3d, SubMConv2d, SubMConv3d
from .sparse_norm import (SparseBatchNorm2d, SparseBatchNorm3d, SparseGroupNorm, SparseInstanceNorm2d,
                          SparseInstanceNorm3d, SparseLayerNorm, SparseSyncBatchNorm)

__all__ = ["SparseBatchNorm2d", "SparseBatchNorm3d", "SparseDownsample2d", "SparseDownsample3d", "SparseGroupNorm",
           "SparseInstanceNorm2d", "SparseInstanceNorm3d", "SparseLayerNorm", "SparseSyncBatchNorm", "SubMConv2d",
           "SubMConv3d"]
