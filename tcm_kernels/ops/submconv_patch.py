"""Patch-block path of the submanifold convolution (experimental): dense tiles with halos, one dense conv.

Public as :func:`tcm_kernels.experimental.submanifold_conv_patch`. No shipped encoder passes a
``patch_size`` and the path only wins in 3-D at patch >= 16 on the CPU (docs/submconv.md "Two
compute paths"), so it is not part of the default dispatch.

When the mask is aligned to p^d patches, every active patch is a dense tile, and a site's
neighbours are either in its own tile or in the halo of width r = dilation * (k - 1) / 2 around it::

    xp    = pad(x * mask, r), channels last          # [B, *(S + 2r), C]: zeros outside and at inactive sites
    tiles = unfold(xp, size p + 2r, step p)[active]  # [T, *(p + 2r), C]: T active patches, strided views
    y_t   = conv(tiles, W, padding=0)                # [T, Cout, *p]: oneDNN / cuDNN, exactly the useful FLOPs
    out[active patches] = y_t                        # zeros elsewhere

Tiles come from strided views of the padded input (:mod:`tcm_kernels._core.patch_tiles`); a halo
wider than a patch (p < r) is still right: it is read from the padded dense input.

Custom ops (autograd from :func:`tcm_kernels._core.autograd.submconv_autograd`):
``tcm::submconv_patch`` (torch tiles, any device) and ``tcm::submconv_patch_triton`` (the tile
kernel of ``tcm_kernels.triton.submconv_patch``), each with its weight-gradient op. The input
gradient is the same path on ``grad_out`` with the flipped, in/out-transposed kernel. The weight
gradient on the CPU is the compiled engine's (``tcm::submconv_weight_grad``: faster than oneDNN's
over the tiles, bit-identical for any thread count); elsewhere the dense conv's weight gradient
over the same tiles. Arithmetic runs in fp32 for fp16/bf16 inputs (fp64 stays fp64). The
alignment check runs inside the op, on real tensors, so a mask that breaks the ``patch_size``
promise raises even when compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from .._core import shapes
from .._core.autograd import submconv_autograd
from .._core.dtypes import accumulation_dtype
from .._core.geometry import halo
from .._core.patch_tiles import active_patches, centre_tiles, gather_tiles, padded_channels_last, patch_view
from ..reference import submconv as _ref
from . import _conv_checks as checks
from ._library import register

_OP = "submanifold_conv_patch"
_CONV = {2: F.conv2d, 3: F.conv3d}


def prefer_patch_path(backend: str, nd: int, patch: int, kernel: tuple[int, ...], dilation: list[int],
                      groups: int) -> bool:
    """Whether the patch-block path is measured (CPU) or expected (Triton) to beat the generic one.

    CPU (measured, docs/submconv.md "Two compute paths"): only 3D layers with patches of >= 16 voxels,
    a halo of at most p / 8 per side (k = 3 at p = 16: the tiles read (18/16)^3 = 1.42x the
    input) and no groups. In 2D (ResNet stages, p = 8 ... 1) oneDNN on 10x10 ... 3x3 tiles is
    slower than the generic engine's GEMM (1.2-5.9x slower at p = 8, 2, 1; a tie at p = 4).
    Triton (not timed, no GPU was available): any patch size; the tile kernel skips the kernel-map
    build, the compact gather and the scatter. ``backend="cuda"``: the generic path.
    """
    if backend != "cpu":
        return backend == "triton"
    return nd == 3 and patch >= 16 and groups == 1 and max(halo(kernel, dilation)) * 8 <= patch


def is_patch_aligned(mask: torch.Tensor, patch_size: int) -> bool:
    """Whether every aligned ``patch_size``^d block of ``mask`` [B, 1, *S] is all-on or all-off (O(S))."""
    spatial = mask.shape[2:]
    if any(s % patch_size for s in spatial):
        return False
    up = _ref.downsample_mask(mask, patch_size)
    for dim in range(2, mask.dim()):
        up = up.repeat_interleave(patch_size, dim=dim)
    return bool(torch.equal(up, mask))


def check_patch_size(op: str, mask: torch.Tensor, patch_size: int) -> None:
    """patch_size a positive int and (eagerly) ``mask`` aligned to it."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")
    if torch.compiler.is_compiling():
        return  # data-dependent check; the op checks again on real tensors
    if not is_patch_aligned(mask, patch_size):
        raise ValueError(f"{op}: mask must be aligned to patches of size {patch_size} (patch_size hint), "
                         "got a mask that is not")


# ---- torch back end: one dense conv over the tiles -----------------------------------------------------------

def _patch_forward(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """[B, Cout, *S] (contiguous, x's dtype): the conv of x [B, Cin, *S] over the active tiles."""
    nd = x.dim() - 2
    patches = active_patches(mask, patch, _OP)
    out = x.new_zeros((x.shape[0], weight.shape[0], *x.shape[2:]))
    if patches[0].numel() == 0:
        return out
    dtype = accumulation_dtype(x.dtype)
    pad = halo(weight.shape[2:], dilation)
    tiles = gather_tiles(padded_channels_last(x, mask, pad, dtype), patches, patch, pad)
    y = _CONV[nd](tiles, weight.to(dtype), None if bias is None else bias.to(dtype), dilation=dilation, groups=groups)
    patch_view(out, patch)[patches] = y.to(x.dtype)
    return out


def _patch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                       dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """dW [Cout, Cin/groups, *k]: the dense conv's weight gradient over the active tiles."""
    nd = x.dim() - 2
    patches = active_patches(mask, patch, _OP)
    if patches[0].numel() == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    dtype = accumulation_dtype(x.dtype)
    pad = halo(weight.shape[2:], dilation)
    tiles = gather_tiles(padded_channels_last(x, mask, pad, dtype), patches, patch, pad)
    grad_tiles = centre_tiles(grad_out, patches, patch, dtype)
    grad_w = torch.ops.aten.convolution_backward(grad_tiles, tiles, weight.to(dtype), None, [1] * nd, [0] * nd,
                                                 dilation, False, [0] * nd, groups, [False, True, False])[1]
    return grad_w.to(weight.dtype).contiguous()


@torch.library.custom_op("tcm::submconv_patch", mutates_args=())
def _submconv_patch(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """Masked-dense in and out, like ``tcm::submconv_forward``, through dense tiles (any device)."""
    return _patch_forward(x, mask, weight, bias, dilation, groups, patch)


@torch.library.custom_op("tcm::submconv_patch_weight_grad", mutates_args=())
def _submconv_patch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                                dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """dW of ``tcm::submconv_patch``: the compiled engine's on the CPU (faster than oneDNN's over the tiles,
    6.9 s vs 8.3 s at 96^3 C64, and bit-identical for any thread count), the tiles' dense one elsewhere."""
    if (x.device.type == "cpu" and x.dtype in checks.COMPILED_DTYPES
            and _backend.compiled_available("submconv_weight_grad", "cpu")):
        return torch.ops.tcm.submconv_weight_grad(grad_out.contiguous(), x, mask, weight, dilation, groups, 0)
    return _patch_weight_grad(grad_out, x, mask, weight, dilation, groups, patch)


@torch.library.custom_op("tcm::submconv_patch_triton", mutates_args=())
def _submconv_patch_triton(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_patch``; triton is imported on first use."""
    from ..triton.submconv_patch import submconv_patch_triton

    return submconv_patch_triton(x, mask, weight, bias, dilation, groups, patch)


@torch.library.custom_op("tcm::submconv_patch_weight_grad_triton", mutates_args=())
def _submconv_patch_weight_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                                       weight: torch.Tensor, dilation: list[int], groups: int,
                                       patch: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_patch_weight_grad``."""
    from ..triton.submconv_patch import submconv_patch_weight_grad_triton

    return submconv_patch_weight_grad_triton(grad_out, x, mask, weight, dilation, groups, patch)


for _suffix in ("", "_triton"):
    register(f"submconv_patch{_suffix}", shapes.conv_dense,
             submconv_autograd(getattr(torch.ops.tcm, f"submconv_patch{_suffix}"),
                               getattr(torch.ops.tcm, f"submconv_patch_weight_grad{_suffix}"), n_geometry=1))
    register(f"submconv_patch_weight_grad{_suffix}", shapes.conv_dense_weight_grad)


def submanifold_conv_patch(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None, *, patch_size: int, dilation: int | tuple[int, ...] = 1,
                           groups: int = 1, backend: str | None = None) -> torch.Tensor:
    """Submanifold conv of a patch-aligned mask through dense tiles (experimental).

    Args:
        x, mask, weight, bias, dilation, groups: as in :func:`tcm_kernels.submanifold_conv`.
        patch_size: p; the mask must be made of aligned, all-on or all-off p^d blocks (ValueError
            otherwise, also under torch.compile).
        backend: ``"triton"`` (CUDA tensors, or TRITON_INTERPRET=1) runs the tile kernel; any other
            choice runs the torch tiles (oneDNN / cuDNN) on x's device; ``"reference"`` the dense
            emulation.

    Returns:
        [B, Cout, *S] in x's dtype, equal to :func:`tcm_kernels.submanifold_conv`.
    """
    nd = checks.check_dense_inputs(_OP, x, mask, weight, bias, groups)
    dil = checks.check_dilation(_OP, dilation, nd)
    checks.check_odd_kernel(_OP, weight)
    check_patch_size(_OP, mask, patch_size)
    chosen = checks.choose_backend(_OP, x, backend)
    if chosen == "reference":
        return _ref.submanifold_conv(x, mask, weight, bias, dilation=tuple(dil), groups=groups)
    if chosen == "triton":
        return torch.ops.tcm.submconv_patch_triton(x, mask, weight, bias, dil, groups, patch_size)
    return torch.ops.tcm.submconv_patch(x, mask, weight, bias, dil, groups, patch_size)
