"""Autograd context shared by the submanifold-conv custom ops (generic, patch-block, Triton patch-block)."""

from __future__ import annotations


def setup_conv_context(ctx, inputs, output) -> None:
    """Inputs (x, mask, weight, bias, dilation, groups, last): save x, mask, weight; keep the rest as config."""
    x, mask, weight, bias, dilation, groups, last = inputs
    ctx.save_for_backward(x, mask, weight)
    ctx.has_bias = bias is not None
    ctx.conf = (list(dilation), groups, last)
