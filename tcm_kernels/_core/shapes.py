"""Shape functions: output shapes and dtypes of the custom ops, the bodies of their fake implementations.

Every (op, back end) registration in ``tcm_kernels.ops`` uses these, so a compiled op and its
Triton twin have the same fake by construction. Nothing here reads tensor data.
"""

from __future__ import annotations

import math

import torch

from .dtypes import accumulation_dtype


# ---- submanifold convolution -------------------------------------------------------------------------------

def conv_dense(x, mask, weight, bias, dilation, groups, extra):
    """Masked-dense conv: x [B, Cin, *S] -> [B, Cout, *S] (extra = chunk_rows or patch size)."""
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


def conv_dense_weight_grad(grad_out, x, mask, weight, dilation, groups, extra):
    """dW of the masked-dense conv: [Cout, Cin/groups, *k], contiguous."""
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def conv_compact(features, grid, sites, weight, bias, dilation, groups, chunk_rows):
    """Compact conv: features [N, Cin] -> [N, Cout]."""
    return features.new_empty((features.shape[0], weight.shape[0]))


def conv_compact_weight_grad(grad_out, features, grid, sites, weight, dilation, groups, chunk_rows):
    """dW of the compact conv: [Cout, Cin/groups, *k], contiguous."""
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def kernel_map(mask):
    """mask [B, 1, *S] -> (grid int32 [B, *S], sites int64 [N]) with N data-dependent."""
    n = torch.library.get_ctx().new_dynamic_size()
    return (mask.new_empty((mask.shape[0], *mask.shape[2:]), dtype=torch.int32),
            mask.new_empty((n,), dtype=torch.int64))


# ---- info_nce -------------------------------------------------------------------------------------------------

def info_nce_lse(x, y, inv_t, with_col, block):
    """(row_lse [M], col_lse [N] or [0]) in the accumulation dtype of x."""
    acc = accumulation_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=acc), x.new_empty((y.shape[0] if with_col else 0,), dtype=acc)


def info_nce_lse_backward(x, y, inv_t, row_lse, col_lse, grad_row_lse, grad_col_lse, block):
    """(grad_x, grad_y, grad_inv_t) shaped like (x, y, inv_t)."""
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(inv_t)


# ---- masked_recon_loss ----------------------------------------------------------------------------------------

def recon_loss_forward(pred, target, patch_size, norm_pix, eps):
    """Per-patch loss [B, N] (N = prod(S / p)) in the accumulation dtype of pred."""
    n = math.prod([s // p for s, p in zip(pred.shape[2:], patch_size)])
    return pred.new_empty((pred.shape[0], n), dtype=accumulation_dtype(pred.dtype))


def recon_loss_backward(grad_per_patch, pred, target, patch_size, norm_pix, eps):
    """Gradient of pred, contiguous."""
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


# ---- masked normalization primitives (x [B, C, L], mask [B, L]) ----------------------------------------------

def masked_moments(x, mask):
    """(count [B], mean [B, C], M2 [B, C]) in the accumulation dtype of x."""
    acc = accumulation_dtype(x.dtype)
    b, c = x.shape[:2]
    return x.new_empty((b,), dtype=acc), x.new_empty((b, c), dtype=acc), x.new_empty((b, c), dtype=acc)


def masked_scale_shift(x, mask, center, scale, shift):
    """y shaped like x, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def masked_grad_moments(dy, x, mask, center):
    """(sum dy [B, C], sum dy * (x - center) [B, C]) shaped like center."""
    return torch.empty_like(center), torch.empty_like(center)


def masked_norm_backward(dy, x, mask, dy_scale, x_scale, center, shift):
    """dx shaped like x, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- the same primitives over rows (x [N, C], segment [N] or None, tables [S, C]) --------------------------

def segment_moments(x, segment, num_segments):
    """(count [S], mean [S, C], M2 [S, C]) in the accumulation dtype of x."""
    acc = accumulation_dtype(x.dtype)
    c = x.shape[1]
    return (x.new_empty((num_segments,), dtype=acc), x.new_empty((num_segments, c), dtype=acc),
            x.new_empty((num_segments, c), dtype=acc))


def segment_scale_shift(x, segment, center, scale, shift):
    """y shaped like x, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def segment_grad_moments(dy, x, segment, center):
    """(sum dy [S, C], sum dy * (x - center) [S, C]) shaped like center."""
    return torch.empty_like(center), torch.empty_like(center)


def segment_norm_backward(dy, x, segment, dy_scale, x_scale, center, shift):
    """dx shaped like x, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)
