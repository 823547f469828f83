"""Experimental ops: public, tested, but outside the default dispatch and without a stability promise.

* :func:`submanifold_conv_patch`: the patch-block path of the submanifold convolution (dense
  tiles with halos, one dense conv). It needs a mask aligned to p^d patches, which no shipped
  encoder passes, and it beats the generic engine only in 3-D at patch >= 16 on the CPU
  (docs/submconv.md); :func:`prefer_patch_path` states that rule.
"""

from ..ops.submconv_patch import is_patch_aligned, prefer_patch_path, submanifold_conv_patch

__all__ = ["is_patch_aligned", "prefer_patch_path", "submanifold_conv_patch"]
