"""Autograd factories: one backward per op family, whatever the back end that registers it.

``tcm_kernels.ops`` registers every (op, back end) pair with ``torch.library.register_autograd``
and takes its ``(backward, setup_context)`` from here, so the derivative of an op family is
written once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .geometry import transposed_kernel


def bias_grad(grad_out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[Cout]: sum of grad_out over its rows (compact [N, Cout], ``mask`` None) or its active sites
    (masked-dense [B, Cout, *S] with mask bool [B, 1, *S]); summed in fp32, returned in grad_out's dtype."""
    if mask is None:
        return grad_out.float().sum(0).to(grad_out.dtype)
    return (grad_out.float() * mask).sum([0, *range(2, grad_out.dim())]).to(grad_out.dtype)


def submconv_autograd(forward: Callable, weight_grad: Callable, n_geometry: int,
                      transposed: Callable[[torch.Tensor, int], torch.Tensor] = transposed_kernel
                      ) -> tuple[Callable, Callable]:
    """``(backward, setup_context)`` of a submanifold-conv op.

    The op's inputs are ``(x, *geometry, weight, bias, dilation, groups, extra)``: ``geometry`` is
    ``(mask,)`` on the masked-dense layout and ``(grid, sites)`` on the compact one (``n_geometry``
    tensors that get no gradient); ``extra`` is a back-end parameter (chunk rows, patch size)
    passed through unchanged. ``forward`` is the op itself and ``weight_grad`` has the signature
    ``(grad_out, x, *geometry, weight, dilation, groups, extra)``.

    Backward: grad_x is ``forward`` on grad_out with the kernel ``transposed(weight, groups)``
    (default :func:`transposed_kernel`; the neighbour relation is symmetric; the ops layer passes a
    cached one), grad_w is ``weight_grad`` and grad_bias is :func:`bias_grad`.
    """
    def setup_context(ctx, inputs, output) -> None:
        x, *geometry = inputs[:1 + n_geometry]
        weight, bias, dilation, groups, extra = inputs[1 + n_geometry:]
        ctx.save_for_backward(x, *geometry, weight)
        ctx.has_bias = bias is not None
        ctx.conf = (list(dilation), groups, extra)

    def backward(ctx, grad_out):
        x, *geometry, weight = ctx.saved_tensors
        dilation, groups, extra = ctx.conf
        grad_out = grad_out.contiguous()
        w_index = 1 + n_geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = forward(grad_out, *geometry, transposed(weight, groups), None, dilation, groups, extra)
        if ctx.needs_input_grad[w_index]:
            grad_w = weight_grad(grad_out, x, *geometry, weight, dilation, groups, extra)
        if ctx.has_bias and ctx.needs_input_grad[w_index + 1]:
            grad_b = bias_grad(grad_out, geometry[0] if n_geometry == 1 else None)
        return grad_x, *(None,) * n_geometry, grad_w, grad_b, None, None, None

    return backward, setup_context


def info_nce_lse_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """``(backward, setup_context)`` of an ``info_nce_lse`` op (inputs x, y, inv_t, with_col, block) through
    its tile-recomputing ``backward_op`` (x, y, inv_t, row_lse, col_lse, grad_row, grad_col, block)."""
    def setup_context(ctx, inputs, output) -> None:
        x, y, inv_t, with_col, block = inputs
        row_lse, col_lse = output
        ctx.save_for_backward(x, y, inv_t, row_lse, col_lse)
        ctx.block = block

    def backward(ctx, grad_row_lse, grad_col_lse):
        x, y, inv_t, row_lse, col_lse = ctx.saved_tensors
        # An unused output arrives as None: its statistics simply get zero weight.
        grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse
        grad_col_lse = torch.zeros_like(col_lse) if grad_col_lse is None else grad_col_lse
        grad_x, grad_y, grad_inv_t = backward_op(x, y, inv_t, row_lse, col_lse, grad_row_lse, grad_col_lse,
                                                 ctx.block)
        return grad_x, grad_y, grad_inv_t, None, None

    return backward, setup_context
