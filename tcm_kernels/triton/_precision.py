"""Dots and down-casts shared by the Triton kernels, identical on the GPU and under the CPU interpreter.

On the GPU, fp16/bf16 operands go to ``tl.dot`` as they are (tensor cores, fp32 accumulation) and fp32
operands with ``input_precision="ieee"`` (exact fp32 products, no TF32: the results match the CPU
kernels and the fp32 reference to round-off; TF32 would be faster on tensor cores but carries ~1e-3
relative error). Triton 3.9's interpreter gets two bf16 operations wrong: its ``tl.dot`` multiplies the
raw bf16 bit patterns, and its fp32 -> bf16 conversion truncates instead of rounding to nearest even.
Kernels therefore take a constexpr ``EMULATE_BF16`` (:func:`emulate_bf16`, never true on a GPU) under
which :func:`dot` upcasts bf16 operands to fp32 (exact: the product of two bf16 values fits in fp32's
mantissa, and the accumulation is fp32 either way) and :func:`to_dtype` rounds to nearest even on the
bits before converting, so the interpreter computes what the GPU computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting


def emulate_bf16(dtype: torch.dtype) -> bool:
    """The ``EMULATE_BF16`` constexpr for operands of ``dtype``: bf16 under the interpreter."""
    return triton_interpreting() and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, EMULATE_BF16: tl.constexpr):
    """acc + a @ b, fp32 accumulation, in the operands' dtype (IEEE fp32 for fp32 operands)."""
    if EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def to_dtype(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` converted to ``dtype``, rounded to nearest even as the GPU does."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
