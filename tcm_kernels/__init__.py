"""tcm_kernels: PyTorch kernels for text-guided masked image modelling on medical images."""

from . import _backend  # loads the compiled extension (or logs why not)
from .ops.sample_mask import MaskSample, patch_scores, sample_mask, upsample_mask
from .ops.submconv import sparse_downsample, submanifold_conv
from .sparse_tensor import SparseTensor

__version__ = "0.1.0"

__all__ = ["MaskSample", "patch_scores", "sample_mask", "upsample_mask", "sparse_downsample", "submanifold_conv",
           "SparseTensor"]
