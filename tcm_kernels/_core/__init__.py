"""Base layer of tcm_kernels: what every kernel, op and module shares, and nothing that registers.

* :mod:`.dtypes`: the accumulation-dtype rule;
* :mod:`.moments`: Chan's merge of partial moments (the norm engine);
* :mod:`.geometry`: kernel geometry (transposed kernel, halo, tap grids, blocked shapes, space-to-depth);
* :mod:`.patch_tiles`: tiles of patch-aligned masks (the patch-block path's geometry);
* :mod:`.sampling`: counting rules of ``sample_mask`` shared by its back ends;
* :mod:`.shapes`: shape functions, the bodies of the fake (meta) implementations;
* :mod:`.autograd`: the autograd factories the ops register.

Together with ``tcm_kernels._backend`` (loading of the compiled extension, back-end choice),
``tcm_kernels._checks`` (boundary checks), ``tcm_kernels._autocast`` (the ops' autocast rule) and
``tcm_kernels.sparse_tensor`` (the compact layout),
this layer imports nothing of tcm_kernels above it (``tests/test_layers.py`` enforces it; the
layers are described in docs/architecture.md).
"""
