"""tcm_kernels: PyTorch kernels for text-guided masked image modelling on medical images."""

from . import _backend  # loads the compiled extension (or logs why not)
from . import experimental, nn
from .ops.coral import CovarianceQueue, coral_loss
from .ops.info_nce import info_nce
from .ops.recon_loss import masked_recon_loss
from .ops.sample_mask import MaskSample, patch_scores, sample_mask, upsample_mask
from .ops.sparse_norm import densify, sparse_batch_norm, sparse_group_norm, sparse_instance_norm, sparse_layer_norm
from .ops.downsample import sparse_downsample, sparse_downsample_compact
from .ops.submconv import submanifold_conv
from .ops.submconv_compact import submanifold_conv_compact
from .sparse_tensor import KernelMap, SparseTensor

__version__ = "0.1.0"

__all__ = ["CovarianceQueue", "KernelMap", "MaskSample", "SparseTensor", "coral_loss", "densify", "info_nce",
           "experimental", "masked_recon_loss", "nn", "patch_scores", "sample_mask", "sparse_batch_norm", "sparse_downsample",
           "sparse_downsample_compact", "sparse_group_norm", "sparse_instance_norm", "sparse_layer_norm",
           "submanifold_conv", "submanifold_conv_compact", "upsample_mask"]
