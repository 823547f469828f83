
from .sparse_norm import (SparseBatchNorm2d, SparseBatchNorm3d, SparseGroupNorm, SparseInstanceNorm2d,
                          SparseInstanceNorm3d, SparseLayerNorm, SparseSyncBatchNorm)

__all__ = ["SparseBatchNorm2d", "SparseBatchNorm3d", "SparseGroupNorm", "SparseInstanceNorm2d",
           "SparseInstanceNorm3d", "SparseLayerNorm", "SparseSyncBatchNorm"]
