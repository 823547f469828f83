"""Submanifold sparse convolution (2-D and 3-D) on the masked-dense layout.

Layout: masked-dense (SparK). ``x`` [B, C, *S] holds features, ``mask`` bool
[B, 1, *S] says which sites are active. The result equals the dense reference
``conv(x * mask) * mask`` ("same" padding, stride 1), but the compiled engine
only touches active sites:

1. kernel map: a dense int32 grid with the compact row of every active site (-1
   elsewhere), so a neighbour is one bounds check and one load, no hash;
2. the active features are gathered into a compact channels-last matrix
   X [N_active, C] (fp32 accumulation for fp16/bf16 inputs);
3. implicit GEMM: active rows are cut into cache-sized chunks; each chunk's
   im2col block [R, k^d C/groups] is gathered through the grid and multiplied by
   the weight with one GEMM per group (depthwise: a direct vectorised loop);
4. the compact result is scattered back to the dense output.

Backward (:func:`tcm_kernels._core.autograd.submconv_autograd`): the input gradient is the same
engine run on ``grad_out`` with the flipped, in/out-transposed kernel (the neighbour relation is
symmetric, so no atomics are needed); the weight gradient sums ``A^T G`` over chunks in a fixed,
shape-determined number of partitions, added in order: deterministic.

The compact layout (:mod:`.submconv_compact`) runs step 3 alone. The custom ops are registered in
:mod:`._submconv_ops`; the patch-block path is experimental (:mod:`.submconv_patch`).
"""

from __future__ import annotations

import warnings

import torch

from .._autocast import autocast_rule
from .._core import geometry
from ..reference import submconv as _ref
from . import _conv_checks as checks
from . import submconv_compact, submconv_patch
from ._submconv_ops import conv_op
from .weight_layout import cached_weight

_OP = "submanifold_conv"
PATHS = ("auto", "generic", "patch")


@autocast_rule("lowp")
def submanifold_conv(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     dilation: int | tuple[int, ...] = 1, groups: int = 1, patch_size: int | None = None,
                     backend: str | None = None, chunk_rows: int = 0, path: str = "auto") -> torch.Tensor:
    """Submanifold sparse convolution on the masked-dense layout.

    Args:
        x: float [B, Cin, H, W] or [B, Cin, D, H, W] (fp32/fp16/bf16; fp64 on the
            reference), Cin >= 1. Values at inactive sites are ignored (on every back end:
            NaN or inf there does not reach the output). Any strides (channels-last included).
        mask: bool [B, 1, *S], True = active site.
        weight: [Cout, Cin/groups, *k], odd k (1, 3, 5, 7, ...), dtype of x.
        bias: optional [Cout].
        dilation: int in [1, 2^31) or one per spatial dim; padding is "same" = dilation * (k - 1) / 2.
        groups: grouped / depthwise convolution (groups = Cin).
        patch_size: deprecated (DeprecationWarning): hint that the mask is made of aligned p^d
            blocks; still validated (ValueError when p does not divide S or a patch is partly
            active). It no longer selects a path: use
            :func:`tcm_kernels.experimental.submanifold_conv_patch`.
        backend: ``"reference" | "cpu" | "triton" | "cuda"``; default: the compiled engine
            on CPU tensors, the Triton implicit GEMM on CUDA tensors (``"cuda"``: CUDA kernel
            map / gathers + cuBLAS GEMMs, compile-checked only).
        chunk_rows: active rows per implicit-GEMM block, in [0, 2^20] (0 = sized to the L2 cache).
        path: ``"auto"`` / ``"generic"``: the implicit GEMM over the kernel map (any mask);
            ``"patch"`` (deprecated, DeprecationWarning; needs ``patch_size``): the experimental
            patch-block path. Ignored by ``backend="reference"``.

    Returns:
        [B, Cout, *S] in x's dtype, contiguous; exactly 0 at inactive sites. Equals
        ``conv(x * mask) * mask`` of the dense reference.
    """
    nd = checks.check_dense_inputs(_OP, x, mask, weight, bias, groups)
    dil = checks.check_dilation(_OP, dilation, nd)
    checks.check_odd_kernel(_OP, weight)
    checks.check_chunk_rows(_OP, chunk_rows)
    if path not in PATHS:
        raise ValueError(f"{_OP}: path must be one of {PATHS}, got {path!r}")
    if path == "patch" and patch_size is None:
        raise ValueError(f"{_OP}: path='patch' needs patch_size (the patch size of the mask at this scale), got None")
    if patch_size is not None:
        warnings.warn(f"{_OP}: patch_size and path='patch' are deprecated; the patch-block path moved to "
                      "tcm_kernels.experimental.submanifold_conv_patch", DeprecationWarning, stacklevel=2)
        submconv_patch.check_patch_size(_OP, mask, patch_size)
    chosen = checks.choose_backend(_OP, x, backend)
    if chosen == "reference":
        return _ref.submanifold_conv(x, mask, weight, bias, dilation=tuple(dil), groups=groups)
    if path == "patch":
        op = torch.ops.tcm.submconv_patch_triton if chosen == "triton" else torch.ops.tcm.submconv_patch
        return op(x, mask, weight, bias, dil, groups, patch_size)
    if chosen == "cpu":
        weight = cached_weight(weight, groups)
    return conv_op("dense", chosen)(x, mask, weight, bias, dil, groups, chunk_rows)


# Names that lived here before the split by job (issue 14): they still resolve, with a DeprecationWarning.
_MOVED = {"transposed_kernel": (geometry, "tcm_kernels._core.geometry"),
          "space_to_depth": (geometry, "tcm_kernels._core.geometry"),
          "is_patch_aligned": (submconv_patch, "tcm_kernels.experimental"),
          "prefer_patch_path": (submconv_patch, "tcm_kernels.experimental"),
          "submanifold_conv_compact": (submconv_compact, "tcm_kernels")}


def __getattr__(name: str):
    if name in _MOVED:
        module, home = _MOVED[name]
        warnings.warn(f"tcm_kernels.ops.submconv.{name} is deprecated; use {home}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
