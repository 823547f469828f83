"""SparK's sparse downsampling between encoder stages, on both layouts.

A conv with kernel = stride = s is a space-to-depth of the masked input followed by a 1x1 conv
with ``weight.reshape(Cout, Cin * s^d, 1, ...)``; the masked-dense op runs that 1x1 conv as a
submanifold conv at the output mask, the compact op as one GEMM over the output rows.
"""

from __future__ import annotations

import torch

from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .._core.geometry import space_to_depth
from ..reference import submconv as _ref
from ..sparse_tensor import SparseTensor
from . import _conv_checks as checks
from .weight_layout import cached_weight
from .submconv import submanifold_conv

_OP = "sparse_downsample"


@autocast_rule("lowp")
def sparse_downsample(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      stride: int, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparK's downsampling between stages: conv with kernel = stride, output mask = max-pool of the mask.

    Args:
        x: [B, Cin, *S]; mask: bool [B, 1, *S]; weight: [Cout, Cin, *(stride,)*d] (kernel = stride);
            bias: optional [Cout]; stride: positive int, divides every S.
        backend: ``"reference"`` (the dense strided conv of the masked input) or a
            :func:`tcm_kernels.submanifold_conv` back end for the 1x1 conv (default: its choice).

    Returns:
        (y [B, Cout, *(S / stride)], mask_out bool [B, 1, *(S / stride)]) with y = 0 where mask_out is False.
    """
    nd = checks.check_dense_inputs(_OP, x, mask, weight, bias, 1)
    checks.check_stride(_OP, stride, weight, tuple(x.shape[2:]), nd)
    if backend == "reference":
        return _ref.sparse_downsample(x, mask, weight, bias, stride=stride)
    mask_out = _ref.downsample_mask(mask, stride)
    cols = space_to_depth(torch.where(mask, x, 0), stride)
    y = submanifold_conv(cols, mask_out, weight.reshape(weight.shape[0], -1, *(1,) * nd), bias, backend=backend)
    return y, mask_out


@autocast_rule("lowp")
def sparse_downsample_compact(x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                              stride: int) -> SparseTensor:
    """:func:`sparse_downsample` on the compact layout: SparseTensor [N, Cin] -> SparseTensor [N_out, Cout].

    Output sites are the coarse sites (coords // stride) with at least one active child, in ascending
    (batch, *spatial) order; their kernel map comes attached. Each input row is copied to its slot
    (child window position) of a zero [N_out, s^d * Cin] matrix (missing children stay zero), then one
    GEMM with ``weight`` [Cout, Cin, s, ..., s] (+ bias). Plain torch ops (any device); backward is
    index_select + mm: deterministic.
    """
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{_OP}: x must be a SparseTensor, got {type(x).__name__}")
    features, nd = x.features, x.ndim
    check_tensor(_OP, "features", features, ndim=2, dtypes=FLOAT_DTYPES)
    checks.check_weight_bias(_OP, weight, bias, 1, features.shape[1], features.dtype, nd)
    check_same_device(_OP, features=features, weight=weight, **({} if bias is None else {"bias": bias}))
    cin, cout = features.shape[1], weight.shape[0]
    checks.check_stride(_OP, stride, weight, x.spatial_shape, nd)
    coarse, inverse = x.coarsen(stride)
    window = stride**nd
    child = torch.zeros_like(inverse)
    for axis in range(nd):
        child = child * stride + x.coords[:, 1 + axis].long() % stride
    n_out = coarse.features.shape[0]
    cols = features.new_zeros((n_out * window, cin)).index_copy(0, inverse * window + child, features)
    # columns in (child, cin) order, as cols; a view of the cached GEMM layout on the CPU (no copy per call)
    w = cached_weight(weight, 1).movedim(1, -1).reshape(cout, window * cin)
    cols = cols.reshape(n_out, window * cin)
    return coarse.replace_features(cols @ w.t() if bias is None else torch.addmm(bias, cols, w.t()))
