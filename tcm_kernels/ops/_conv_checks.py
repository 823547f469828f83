"""Boundary checks shared by the submanifold-conv ops (masked-dense, compact, patch-block, downsample).

Messages: ``<op>: <arg> must be <expected>, got <received>``.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..sparse_tensor import KernelMap

COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The compiled and Triton kernels hold dilations and site offsets in int32.
MAX_DILATION = 2**31 - 1
# Rows per implicit-GEMM chunk: 0 = sized to the L2 cache; beyond 2^20 rows a chunk's im2col block
# (rows x k^d Cin floats) no longer fits any cache and only costs memory.
MAX_CHUNK_ROWS = 2**20


def check_dense_inputs(op: str, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       groups: int) -> int:
    """x [B, Cin, *S] (d = 2 or 3), mask bool [B, 1, *S], weight/bias as :func:`check_weight_bias`; returns d."""
    check_tensor(op, "x", x, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    nd = x.dim() - 2
    check_tensor(op, "mask", mask, dtypes=(torch.bool,))
    if tuple(mask.shape) != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(f"{op}: mask must be [B, 1, *S] = {(x.shape[0], 1, *x.shape[2:])}, got shape "
                         f"{tuple(mask.shape)}")
    check_weight_bias(op, weight, bias, groups, x.shape[1], x.dtype, nd)
    check_same_device(op, x=x, mask=mask, weight=weight, **({} if bias is None else {"bias": bias}))
    return nd


def check_compact_inputs(op: str, features: torch.Tensor, kernel_map: KernelMap, weight: torch.Tensor,
                         bias: torch.Tensor | None, groups: int) -> int:
    """features [N, Cin], a :class:`KernelMap` of N rows, weight/bias as :func:`check_weight_bias`; returns d."""
    check_tensor(op, "features", features, ndim=2, dtypes=FLOAT_DTYPES)
    if not isinstance(kernel_map, KernelMap):
        raise TypeError(f"{op}: kernel_map must be a KernelMap (SparseTensor.kernel_map()), got "
                        f"{type(kernel_map).__name__}")
    grid, sites = kernel_map
    check_tensor(op, "kernel_map.grid", grid, ndim=(3, 4), dtypes=(torch.int32,))
    check_tensor(op, "kernel_map.sites", sites, ndim=1, dtypes=(torch.int64,))
    if sites.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: kernel_map.sites must have one entry per row of features (N={features.shape[0]}), "
                         f"got {sites.shape[0]}")
    nd = grid.dim() - 1
    check_weight_bias(op, weight, bias, groups, features.shape[1], features.dtype, nd)
    check_same_device(op, features=features, grid=grid, sites=sites, weight=weight,
                      **({} if bias is None else {"bias": bias}))
    return nd


def check_weight_bias(op: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, cin: int,
                      dtype: torch.dtype, nd: int) -> None:
    """weight [Cout, Cin/groups, *k] (d = nd) and bias [Cout], both of ``dtype``; groups a positive int; Cin >= 1."""
    check_tensor(op, "weight", weight, ndim=nd + 2, dtypes=(dtype,))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if cin < 1:
        raise ValueError(f"{op}: input channels must be >= 1, got Cin={cin}")
    cout = weight.shape[0]
    if cin % groups or cout % groups or weight.shape[1] * groups != cin:
        raise ValueError(f"{op}: weight must be [Cout, Cin/groups, *k] with Cin={cin} and Cout divisible by "
                         f"groups={groups}, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(dtype,))
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias must be [Cout={cout}], got shape {tuple(bias.shape)}")


def check_odd_kernel(op: str, weight: torch.Tensor) -> None:
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"{op}: kernel size must be odd, got weight shape {tuple(weight.shape)}")


def check_dilation(op: str, dilation: int | tuple[int, ...], nd: int) -> list[int]:
    """``dilation`` as ``nd`` ints in [1, 2^31) (an int is repeated)."""
    dil = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    if len(dil) != nd or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DILATION
                             for d in dil):
        raise ValueError(f"{op}: dilation must be a positive int or {nd} positive ints, each < 2^31, got {dilation!r}")
    return dil


def check_chunk_rows(op: str, chunk_rows: int) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or not 0 <= chunk_rows <= MAX_CHUNK_ROWS:
        raise ValueError(f"{op}: chunk_rows must be an int in [0, {MAX_CHUNK_ROWS}] (0 = sized to the cache), "
                         f"got {chunk_rows!r}")
    return chunk_rows


def check_stride(op: str, stride: int, weight: torch.Tensor, spatial: tuple[int, ...], nd: int) -> None:
    """stride a positive int dividing every spatial size; weight's kernel = stride."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{op}: stride must be a positive int, got {stride!r}")
    if tuple(weight.shape[2:]) != (stride,) * nd:
        raise ValueError(f"{op}: weight kernel must equal the stride {(stride,) * nd}, got shape {tuple(weight.shape)}")
    if any(s % stride for s in spatial):
        raise ValueError(f"{op}: stride {stride} must divide the spatial shape {spatial}")


def choose_backend(op: str, x: torch.Tensor, backend: str | None, compiled_op: str = "submconv_forward") -> str:
    """The back end of a conv op on x: :func:`tcm_kernels._backend.choose_backend`, and the reference for
    fp64 (the compiled and Triton kernels take fp32/fp16/bf16; a forced one raises TypeError)."""
    chosen = _backend.choose_backend(compiled_op, x.device, backend, has_cuda_kernel=compiled_op == "submconv_forward")
    if chosen != "reference" and x.dtype not in COMPILED_DTYPES:
        if backend is not None:
            raise TypeError(f"{op}: backend={backend!r} supports float32/float16/bfloat16, got "
                            f"{str(x.dtype).replace('torch.', '')}")
        return "reference"
    return chosen
