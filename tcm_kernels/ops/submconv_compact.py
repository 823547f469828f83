"""Submanifold sparse convolution on the compact layout: rows in, rows out, no gather/scatter.

Features [N, C] plus a :class:`~tcm_kernels.sparse_tensor.KernelMap` (grid, sites) run the
implicit GEMM of :mod:`.submconv` (step 3) alone; the custom ops are registered in
:mod:`._submconv_ops`.
"""

from __future__ import annotations

import torch

from .._autocast import autocast_rule
from ..reference import submconv as _ref
from ..sparse_tensor import KernelMap
from . import _conv_checks as checks
from ._submconv_ops import conv_op
from .weight_layout import cached_weight

_OP = "submanifold_conv_compact"


@autocast_rule("lowp")
def submanifold_conv_compact(features: torch.Tensor, kernel_map: KernelMap, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, *, dilation: int | tuple[int, ...] = 1, groups: int = 1,
                             backend: str | None = None, chunk_rows: int = 0) -> torch.Tensor:
    """Submanifold sparse convolution on the compact layout (no gather/scatter: rows in, rows out).

    Args:
        features: float [N, Cin] (fp32/fp16/bf16; fp64 on the reference), Cin >= 1, one row per
            active site, rows in any order (e.g. ``SparseTensor.features``).
        kernel_map: :class:`~tcm_kernels.KernelMap` (grid int32 [B, *S], sites int64 [N]) of the
            rows, from ``SparseTensor.kernel_map()`` (built once, shared by every conv over the
            same sites). Contract: ``grid.flatten()[sites] == arange(N)`` and -1 at inactive sites.
        weight: [Cout, Cin/groups, *k], odd k, dtype of features; bias: optional [Cout].
        dilation, groups, backend, chunk_rows: as in :func:`tcm_kernels.submanifold_conv`.

    Returns:
        [N, Cout] in features' dtype, row i at the site of input row i: the rows of
        ``submanifold_conv`` of the densified input at the same sites.
    """
    nd = checks.check_compact_inputs(_OP, features, kernel_map, weight, bias, groups)
    dil = checks.check_dilation(_OP, dilation, nd)
    checks.check_odd_kernel(_OP, weight)
    checks.check_chunk_rows(_OP, chunk_rows)
    grid, sites = kernel_map
    chosen = checks.choose_backend(_OP, features, backend, "submconv_compact_forward")
    if chosen == "reference":
        return _ref.submanifold_conv_compact(features, grid, sites, weight, bias, tuple(dil), groups)
    if chosen == "cpu":
        weight = cached_weight(weight, groups)
    return conv_op("compact", chosen)(features, grid, sites, weight, bias, dil, groups, chunk_rows)
