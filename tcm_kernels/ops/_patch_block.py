"""Patch-block path of the submanifold convolution: dense tiles with halos, one dense conv over all of them.

When the mask is aligned to p^d patches (MIM masks are, at every encoder scale), every active
patch is a dense tile, and a site's neighbours are either in its own tile or in the halo of
width r = dilation * (k - 1) / 2 around it. So::

    xp    = pad(x * mask, r), channels last          # [B, *(S + 2r), C]: zeros outside and at inactive sites
    tiles = unfold(xp, size p + 2r, step p)[active]  # [T, *(p + 2r), C]: T active patches, strided views
    y_t   = conv(tiles, W, padding=0)                # [T, Cout, *p]: oneDNN / cuDNN, exactly the useful FLOPs
    out[active patches] = y_t                        # zeros elsewhere

No kernel map and no per-site gather: the tiles come from strided views of the padded input, the
conv is the library's dense one (its FLOPs are exactly the useful ones; only the input is read
((p + 2r) / p)^d times). A halo wider than a patch (p < r) is still right: it is read from the
padded dense input, not from the neighbouring tiles.

Backward: the input gradient is this same path run on ``grad_out`` with the flipped,
in/out-transposed kernel (as in the generic engine). The weight gradient on the CPU is the
compiled engine's (``tcm::submconv_weight_grad``: faster than oneDNN's over the tiles, and
bit-identical for any thread count); elsewhere (or without the build) it is the dense conv's
weight gradient over the same tiles (``aten.convolution_backward``; deterministic on the CPU for
a fixed thread count). The bias gradient is a masked sum.
Arithmetic runs in fp32 for fp16/bf16 inputs (fp64 stays fp64).

Wrapped as the custom op ``tcm_patch::submconv`` (autograd + fake implementation), so
``torch.compile(fullgraph=True)`` keeps it as one opaque node; the alignment check runs inside
the op, on real tensors, so a mask that breaks the ``patch_size`` promise raises even when compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ._conv_autograd import setup_conv_context

_OP = "submanifold_conv"
_CONV = {2: F.conv2d, 3: F.conv3d}
PATHS = ("auto", "generic", "patch")


def prefer_patch_path(backend: str, nd: int, patch: int, kernel: tuple[int, ...], dilation: list[int],
                      groups: int) -> bool:
    """The automatic rule: whether the patch-block path is the faster one for this layer.

    CPU (measured, docs/submconv.md "Two compute paths"): only 3D layers with patches of >= 16 voxels,
    a halo of at most p / 8 per side (k = 3 at p = 16: the tiles read (18/16)^3 = 1.42x the
    input) and no groups. There oneDNN's conv over the tiles runs near at::mm's rate while the
    generic engine's per-row im2col of 27 taps costs more than the tile copies. In 2D (ResNet
    stages, p = 8 ... 1) oneDNN on 10x10 ... 3x3 tiles is slower than the generic engine's GEMM
    (1.2-5.9x slower at p = 8, 2, 1; a tie at p = 4), so the generic path is used.
    Triton (not timed, no GPU was available): any hinted patch size. The tile kernel does the
    same ``tl.dot`` work as the generic kernel and reads/writes the masked-dense tensors in place,
    skipping the kernel-map build, the compact gather and the scatter.
    ``backend="cuda"`` (compile-checked only): the generic path.
    """
    if backend != "cpu":
        return backend == "triton"
    return nd == 3 and patch >= 16 and groups == 1 and max(halo(kernel, dilation)) * 8 <= patch


def use_patch_path(path: str, backend: str, x: torch.Tensor, weight: torch.Tensor, dilation: list[int],
                   groups: int, patch: int | None) -> bool:
    """Validate ``path`` and resolve ``"auto"`` with :func:`prefer_patch_path`."""
    if path not in PATHS:
        raise ValueError(f"{_OP}: path must be one of {PATHS}, got {path!r}")
    if path == "patch" and patch is None:
        raise ValueError(f"{_OP}: path='patch' needs patch_size (the patch size of the mask at this scale), got None")
    if path == "auto":
        return patch is not None and prefer_patch_path(backend, x.dim() - 2, patch, tuple(weight.shape[2:]),
                                                       dilation, groups)
    return path == "patch"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs (half types accumulate in fp32), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def halo(kernel: tuple[int, ...] | list[int], dilation: list[int]) -> list[int]:
    """Halo width r = dilation * (k - 1) / 2 per spatial dim."""
    return [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]


def active_patches(mask: torch.Tensor, patch: int) -> tuple[torch.Tensor, ...]:
    """Indices (b, g_1, ..., g_d) of the active patches of mask [B, 1, *S], T each (int64).

    Raises ValueError when ``patch`` does not divide S or a patch is partly active.
    """
    spatial = tuple(mask.shape[2:])
    if any(s % patch for s in spatial):
        raise ValueError(f"{_OP}: patch_size {patch} must divide the spatial shape {spatial}")
    nd = len(spatial)
    blocks = mask.reshape(mask.shape[0], *[v for s in spatial for v in (s // patch, patch)])
    inner = tuple(range(2, 2 + 2 * nd, 2))
    coarse = blocks.any(dim=inner)
    if not torch.equal(coarse, blocks.all(dim=inner)):
        raise ValueError(f"{_OP}: mask must be aligned to patches of size {patch} (patch_size hint), "
                         "got a mask that is not")
    return coarse.nonzero(as_tuple=True)


def padded_channels_last(t: torch.Tensor, mask: torch.Tensor, pad: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[B, *(S + 2r), C] in ``dtype``: ``t * mask`` channels last with a zero border of width r (one pass)."""
    batch, channels, *spatial = t.shape
    out = t.new_empty((batch, *(s + 2 * r for s, r in zip(spatial, pad)), channels), dtype=dtype)
    for dim, (s, r) in enumerate(zip(spatial, pad)):
        if r:
            out.narrow(1 + dim, 0, r).zero_()
            out.narrow(1 + dim, s + r, r).zero_()
    interior = out[(slice(None), *(slice(r, r + s) for s, r in zip(spatial, pad)))]
    torch.mul(t.movedim(1, -1), mask.movedim(1, -1), out=interior)
    return out


def gather_tiles(padded: torch.Tensor, patches: tuple[torch.Tensor, ...], patch: int, pad: list[int]) -> torch.Tensor:
    """Tiles with halo [T, C, *(p + 2r)] (channels-last strides) of padded [B, *(S + 2r), C]."""
    nd = len(pad)
    view = padded
    for dim, r in enumerate(pad):
        view = view.unfold(1 + dim, patch + 2 * r, patch)  # [B, *G, C, *(p + 2r)]
    tiles = view.movedim(1 + nd, -1)[patches]  # [T, *(p + 2r), C], one contiguous copy
    return tiles.movedim(-1, 1)


def _patch_view(dense: torch.Tensor, patch: int) -> torch.Tensor:
    """View [B, *G, C, *p] of a contiguous dense [B, C, *S] (G = S / p)."""
    batch, channels, *spatial = dense.shape
    nd = len(spatial)
    split = dense.view(batch, channels, *[v for s in spatial for v in (s // patch, patch)])
    return split.permute(0, *range(2, 2 + 2 * nd, 2), 1, *range(3, 3 + 2 * nd, 2))


def centre_tiles(t: torch.Tensor, patches: tuple[torch.Tensor, ...], patch: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, C, *p] in ``dtype``: the active patches of dense t [B, C, *S] (no halo)."""
    return _patch_view(t.contiguous(), patch)[patches].to(dtype)


def patch_forward(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """Submanifold conv of x [B, Cin, *S] on a p-aligned mask -> [B, Cout, *S] (contiguous, x's dtype)."""
    nd = x.dim() - 2
    patches = active_patches(mask, patch)
    out = x.new_zeros((x.shape[0], weight.shape[0], *x.shape[2:]))
    if patches[0].numel() == 0:
        return out
    dtype = compute_dtype(x.dtype)
    pad = halo(weight.shape[2:], dilation)
    tiles = gather_tiles(padded_channels_last(x, mask, pad, dtype), patches, patch, pad)
    y = _CONV[nd](tiles, weight.to(dtype), None if bias is None else bias.to(dtype), dilation=dilation, groups=groups)
    _patch_view(out, patch)[patches] = y.to(x.dtype)
    return out


def patch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                      dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """dW [Cout, Cin/groups, *k]: the dense conv's weight gradient over the active tiles."""
    nd = x.dim() - 2
    patches = active_patches(mask, patch)
    if patches[0].numel() == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    dtype = compute_dtype(x.dtype)
    pad = halo(weight.shape[2:], dilation)
    tiles = gather_tiles(padded_channels_last(x, mask, pad, dtype), patches, patch, pad)
    grad_tiles = centre_tiles(grad_out, patches, patch, dtype)
    grad_w = torch.ops.aten.convolution_backward(grad_tiles, tiles, weight.to(dtype), None, [1] * nd, [0] * nd,
                                                 dilation, False, [0] * nd, groups, [False, True, False])[1]
    return grad_w.to(weight.dtype).contiguous()


@torch.library.custom_op("tcm_patch::submconv", mutates_args=())
def submconv_patch(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """Masked-dense in and out, like ``tcm::submconv_forward``, through dense tiles (any device)."""
    return patch_forward(x, mask, weight, bias, dilation, groups, patch)


@submconv_patch.register_fake
def _submconv_patch_fake(x, mask, weight, bias, dilation, groups, patch):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


@torch.library.custom_op("tcm_patch::submconv_weight_grad", mutates_args=())
def submconv_patch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                               dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """dW of ``tcm_patch::submconv``."""
    return patch_weight_grad(grad_out, x, mask, weight, dilation, groups, patch)


@submconv_patch_weight_grad.register_fake
def _weight_grad_fake(grad_out, x, mask, weight, dilation, groups, patch):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def masked_bias_grad(grad_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Cout]: sum of grad_out over the active sites (fp32 sum, grad_out's dtype)."""
    return (grad_out.float() * mask).sum([0, *range(2, grad_out.dim())]).to(grad_out.dtype)


def _compiled_weight_grad(x: torch.Tensor) -> bool:
    """Whether the compiled engine's weight gradient serves (CPU): it beat oneDNN's weight gradient over
    the tiles on the 3D benchmark layers (6.9 s vs 8.3 s at 96^3 C64) and is bit-identical for any
    thread count."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _backend.compiled_available("submconv_weight_grad", "cpu"))


def _backward(ctx, grad_out):
    from .submconv import transposed_kernel

    x, mask, weight = ctx.saved_tensors
    dilation, groups, patch = ctx.conf
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = submconv_patch(grad_out, mask, transposed_kernel(weight, groups), None, dilation, groups, patch)
    if ctx.needs_input_grad[2]:
        if _compiled_weight_grad(x):
            grad_w = torch.ops.tcm.submconv_weight_grad(grad_out.contiguous(), x, mask, weight, dilation, groups, 0)
        else:
            grad_w = submconv_patch_weight_grad(grad_out, x, mask, weight, dilation, groups, patch)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = masked_bias_grad(grad_out, mask)
    return grad_x, None, grad_w, grad_b, None, None, None


submconv_patch.register_autograd(_backward, setup_context=setup_conv_context)
