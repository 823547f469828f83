"""tcm_kernels: PyTorch kernels for text-guided masked image modelling on medical images."""

from . import _backend  # loads the compiled extension (or logs why not)
from .ops.coral import CovarianceQueue, coral_loss
from .ops.info_nce import info_nce
from .ops.sample_mask import MaskSample, patch_scores, sample_mask, upsample_mask

__version__ = "0.1.0"

__all__ = ["CovarianceQueue", "MaskSample", "coral_loss", "info_nce", "patch_scores", "sample_mask", "upsample_mask"]
