"""tcm_kernels: PyTorch kernels for text-guided masked image modelling on medical images."""

from . import _backend  # loads the compiled extension (or logs why not)
from .ops.sample_mask import MaskSample, patch_scores, sample_mask, upsample_mask
from .ops.recon_loss import masked_recon_loss
from .ops.sparse_norm import (densify, sparse_batch_norm, sparse_group_norm, sparse_instance_norm,
                              sparse_layer_norm)
from . import nn

__version__ = "0.1.0"

__all__ = ["MaskSample", "patch_scores", "sample_mask", "upsample_mask"]
__all__ += ["densify", "masked_recon_loss", "nn", "sparse_batch_norm", "sparse_group_norm", "sparse_instance_norm",
            "sparse_layer_norm"]
