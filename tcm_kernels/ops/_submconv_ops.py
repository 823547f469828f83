"""Custom ops of the submanifold convolution (generic path): one registration per (op, back end).

=============================  ========================================  =================================
op                             compiled (schema in csrc/ops.cpp)         Triton (``tcm_kernels.triton``)
=============================  ========================================  =================================
masked-dense forward           ``tcm::submconv_forward``                 ``tcm::submconv_forward_triton``
masked-dense weight gradient   ``tcm::submconv_weight_grad``             ``tcm::submconv_weight_grad_triton``
compact forward                ``tcm::submconv_compact_forward``         ``tcm::submconv_compact_forward_triton``
compact weight gradient        ``tcm::submconv_compact_weight_grad``     ``tcm::submconv_compact_weight_grad_triton``
kernel map                     ``tcm::submconv_kernel_map``              (torch ops, any device)
=============================  ========================================  =================================

Twins share a schema, so they share the fake (:mod:`tcm_kernels._core.shapes`) and the autograd
(:func:`tcm_kernels._core.autograd.submconv_autograd`); the Triton ops ignore ``chunk_rows``
(a CPU cache parameter). The patch-block path registers its own pair in :mod:`.submconv_patch`.
"""

from __future__ import annotations

import torch

from .._core import shapes
from .._core.autograd import submconv_autograd
from ._library import register
from .weight_layout import transposed_kernel


@torch.library.custom_op("tcm::submconv_forward_triton", mutates_args=())
def _forward_triton(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    dilation: list[int], groups: int, chunk_rows: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_forward``; triton is imported on first use."""
    from ..triton.submconv import submconv_triton

    return submconv_triton(x, mask, weight, bias, dilation, groups)


@torch.library.custom_op("tcm::submconv_weight_grad_triton", mutates_args=())
def _weight_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                        dilation: list[int], groups: int, chunk_rows: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_weight_grad``."""
    from ..triton.submconv import submconv_weight_grad_triton

    return submconv_weight_grad_triton(grad_out, x, mask, weight, dilation, groups)


@torch.library.custom_op("tcm::submconv_compact_forward_triton", mutates_args=())
def _compact_forward_triton(features: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, dilation: list[int], groups: int,
                            chunk_rows: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_compact_forward``."""
    from ..triton.submconv import submconv_compact_triton

    return submconv_compact_triton(features, grid, sites, weight, bias, dilation, groups)


@torch.library.custom_op("tcm::submconv_compact_weight_grad_triton", mutates_args=())
def _compact_weight_grad_triton(grad_out: torch.Tensor, features: torch.Tensor, grid: torch.Tensor,
                                sites: torch.Tensor, weight: torch.Tensor, dilation: list[int], groups: int,
                                chunk_rows: int) -> torch.Tensor:
    """Triton back end of ``tcm::submconv_compact_weight_grad``."""
    from ..triton.submconv import submconv_compact_weight_grad_triton

    return submconv_compact_weight_grad_triton(grad_out, features, grid, sites, weight, dilation, groups)


register("submconv_kernel_map", shapes.kernel_map)
for _suffix in ("", "_triton"):
    _ops = torch.ops.tcm
    register(f"submconv_forward{_suffix}", shapes.conv_dense,
             submconv_autograd(getattr(_ops, f"submconv_forward{_suffix}"),
                               getattr(_ops, f"submconv_weight_grad{_suffix}"), n_geometry=1,
                               transposed=transposed_kernel))
    register(f"submconv_weight_grad{_suffix}", shapes.conv_dense_weight_grad)
    register(f"submconv_compact_forward{_suffix}", shapes.conv_compact,
             submconv_autograd(getattr(_ops, f"submconv_compact_forward{_suffix}"),
                               getattr(_ops, f"submconv_compact_weight_grad{_suffix}"), n_geometry=2,
                               transposed=transposed_kernel))
    register(f"submconv_compact_weight_grad{_suffix}", shapes.conv_compact_weight_grad)


def conv_op(layout: str, backend: str):
    """The ``torch.ops.tcm`` forward op of a layout (``"dense"`` | ``"compact"``) on a back end.

    ``"triton"`` selects the Triton twin; ``"cpu"`` and ``"cuda"`` the compiled op (its CPU or CUDA kernel).
    """
    name = "submconv_forward" if layout == "dense" else "submconv_compact_forward"
    return getattr(torch.ops.tcm, name + ("_triton" if backend == "triton" else ""))
