"""Triton back end of the submanifold convolution: an implicit GEMM with ``tl.dot`` over the kernel map.

Tiles and grid
--------------
Compact features X [N, Cin] (rows in any order), kernel map ``grid`` int32 [B, *S] (row or -1)
and ``sites`` int64 [N] (linear site of each row), weight in GEMM layout Wg [G, K, Cin/G, Cout/G]
in the features' dtype.
One program computes a BLOCK_M x BLOCK_N tile of Y [N, Cout] for one group::

    for tap k in 0..K-1:                       # K = k^d kernel taps
        nb = grid[site(rows) + offset_k]       # neighbour rows, -1 when outside / inactive
        for c0 in 0..Cin/G step BLOCK_K:
            acc += X[nb, c0:c0+BLOCK_K] @ Wg[g, k, c0:c0+BLOCK_K, cols]   # masked rows load 0

grid = (cdiv(N, BLOCK_M), cdiv(Cout/G, BLOCK_N), G) (dimensions 1 and 2 checked against CUDA's 65,535 by
``_launch.launch``: up to ~1M channels per group and 65,535 groups). Each output element is owned by one
program: no atomics, deterministic. ``tl.dot`` runs in the features' dtype with fp32 accumulation:
fp16/bf16 on tensor cores (the weight is rounded to that dtype, as autocast does), fp32 with
``input_precision="ieee"`` (no TF32 rounding: results match the CPU kernels to fp32 round-off; see
``_precision``). The input gradient is the same
kernel run on grad_out with the flipped, in/out-transposed kernel; the weight gradient is
K GEMMs ``X[nb_k]^T G`` through torch (deterministic).

Both layouts share the launcher :func:`conv_rows` and :func:`weight_grad_rows`: the compact launcher
calls them on the rows as given, the masked-dense one gathers the active rows first and scatters the
result back. ``tcm_kernels.ops`` registers them as ``tcm::submconv_*_triton`` custom ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._precision import dot, emulate_bf16


@triton.jit
def _submconv_rows_kernel(
    x_ptr,  # [N, CIN] compact input features (fp32/fp16/bf16), row-major
    w_ptr,  # [G, K, CIN_G, COUT_G] weight in x's dtype, GEMM layout
    bias_ptr,  # fp32 [COUT] (read only when HAS_BIAS)
    y_ptr,  # fp32 [N, COUT] output rows
    grid_ptr,  # int32 [B * D * H * W] kernel map: row of the active site or -1
    sites_ptr,  # int64 [N] linear site index of each row
    offsets_ptr,  # int32 [K, 3] tap displacements (dz, dy, dx), dilation included
    n_rows, depth, height, width, cin, cout, cin_g, cout_g, taps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    site = tl.load(sites_ptr + rows, mask=row_ok, other=0)
    xs = site % width
    rest = site // width
    ys = rest % height
    rest = rest // height
    zs = rest % depth
    bs = rest // depth
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < cout_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, taps):
        z = zs + tl.load(offsets_ptr + 3 * k)
        y = ys + tl.load(offsets_ptr + 3 * k + 1)
        x = xs + tl.load(offsets_ptr + 3 * k + 2)
        inside = row_ok & (z >= 0) & (z < depth) & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        nb = tl.load(grid_ptr + ((bs * depth + z) * height + y) * width + x, mask=inside, other=-1)
        has = nb >= 0
        for c0 in range(0, cin_g, BLOCK_K):
            ks = c0 + tl.arange(0, BLOCK_K)
            k_ok = ks < cin_g
            a = tl.load(x_ptr + nb.to(tl.int64)[:, None] * cin + grp * cin_g + ks[None, :],
                        mask=has[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ((grp * taps + k) * cin_g + ks[:, None]) * cout_g + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot(a, w, acc, EMULATE_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + grp * cout_g + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * cout + grp * cout_g + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


def _block(n: int, low: int = 16, high: int = 64) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def launch_tiles(cin_g: int, cout_g: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of both submconv kernels: 8 warps (4 spilled 144-280 B per
    thread in the patch kernel, whose int64 site arithmetic holds many registers); fp32 dots run on FMA
    units with both operands in registers, so 16-wide K chunks (32 spilled 240 B on sm_80). The largest
    choices are compiled for sm_80/sm_90 in tests/ops/test_submconv*.py."""
    high = 32 if dtype in (torch.float16, torch.bfloat16) else 16
    return 32, _block(cout_g), _block(cin_g, high=high), 8


def kernel_map(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask bool [B, 1, *S] -> (grid int32 [B, *S], sites int64 [N]) with torch ops (any device)."""
    flat = mask.reshape(-1)
    rows = torch.cumsum(flat, 0, dtype=torch.int64) - 1
    grid = torch.where(flat, rows, -1).to(torch.int32).reshape(mask.shape[0], *mask.shape[2:])
    return grid, flat.nonzero().squeeze(1)


def tap_offsets(kernel: tuple[int, ...], dilation: tuple[int, ...], device) -> torch.Tensor:
    """int32 [k^d, 3]: (dz, dy, dx) of every tap, row-major over the kernel (depth 1 in 2-D)."""
    kernel = (1,) * (3 - len(kernel)) + tuple(kernel)
    dilation = (1,) * (3 - len(dilation)) + tuple(dilation)
    axes = [torch.arange(k) * d - (k // 2) * d for k, d in zip(kernel, dilation)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).to(torch.int32).to(device)


def _dhw(grid: torch.Tensor) -> tuple[int, int, int]:
    """(D, H, W) of a grid [B, *S] (D = 1 in 2-D)."""
    return (1,) * (4 - grid.dim()) + tuple(grid.shape[1:])


def gemm_weight(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """weight [Cout, Cin/G, *k] -> GEMM layout [G, K, Cin/G, Cout/G] in the dot's dtype for inputs of ``dtype``."""
    cout, cin_g = weight.shape[:2]
    dt = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    return weight.to(dt).reshape(groups, cout // groups, cin_g, -1).permute(0, 3, 2, 1).contiguous()


def conv_rows(feats: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """Y fp32 [N, Cout] = submanifold conv of the compact rows feats [N, Cin] (launches the kernel)."""
    n, cin = feats.shape
    cout, cin_g, *kernel = weight.shape
    cout_g = cout // groups
    taps = 1
    for k in kernel:
        taps *= k
    depth, height, width = _dhw(grid)
    wg = gemm_weight(weight, groups, feats.dtype)
    y = torch.empty((n, cout), device=feats.device, dtype=torch.float32)
    if n == 0:
        return y
    offsets = tap_offsets(tuple(kernel), dilation, feats.device)
    block_m, block_n, block_k, warps = launch_tiles(cin_g, cout_g, feats.dtype)
    b32 = bias.float().contiguous() if bias is not None else y  # dummy pointer when there is no bias
    launch("submanifold_conv", _submconv_rows_kernel, (triton.cdiv(n, block_m), triton.cdiv(cout_g, block_n), groups),
           feats.device, feats.contiguous(), wg, b32, y, grid.contiguous(), sites.contiguous(), offsets, n, depth,
           height, width, cin, cout, cin_g, cout_g, taps, HAS_BIAS=bias is not None, BLOCK_M=block_m,
           BLOCK_N=block_n, BLOCK_K=block_k, EMULATE_BF16=emulate_bf16(feats.dtype), num_warps=warps)
    return y


def weight_grad_rows(feats: torch.Tensor, g: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor,
                     weight: torch.Tensor, dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """dW [Cout, Cin/G, *k] (weight's dtype): sum over taps of X[nb_k]^T G, one GEMM per tap and group (deterministic)."""
    feats, g = feats.float(), g.float()
    cout, cin_g, *kernel = weight.shape
    cout_g = cout // groups
    d, h, w = _dhw(grid)
    flat_grid = grid.reshape(-1)
    zs, ys, xs = (sites // (h * w)) % d, (sites // w) % h, sites % w
    bs = sites // (d * h * w)
    offsets = tap_offsets(tuple(kernel), tuple(dilation), feats.device).long()
    dw = torch.zeros((cout, cin_g, offsets.shape[0]), device=feats.device, dtype=torch.float32)
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # row -1 -> the zero row
    for k, (dz, dy, dx) in enumerate(offsets.tolist()):
        z, y, xx = zs + dz, ys + dy, xs + dx
        inside = (z >= 0) & (z < d) & (y >= 0) & (y < h) & (xx >= 0) & (xx < w)
        lin = ((bs * d + z.clamp(0, d - 1)) * h + y.clamp(0, h - 1)) * w + xx.clamp(0, w - 1)
        nb = torch.where(inside, flat_grid[lin].long(), -1)
        a = padded[nb]  # [N, Cin], zero rows for missing neighbours
        for grp in range(groups):
            gs = g[:, grp * cout_g:(grp + 1) * cout_g]
            dw[grp * cout_g:(grp + 1) * cout_g, :, k] = gs.t() @ a[:, grp * cin_g:(grp + 1) * cin_g]
    return dw.reshape(weight.shape).to(weight.dtype)


def _compact(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1)[mask[:, 0]]


def _dense(rows: torch.Tensor, mask: torch.Tensor, like: torch.Tensor, channels: int) -> torch.Tensor:
    out = like.new_zeros((like.shape[0], *like.shape[2:], channels))
    out[mask[:, 0]] = rows.to(like.dtype)
    return out.movedim(-1, 1).contiguous()


def submconv_triton(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    dilation: list[int], groups: int) -> torch.Tensor:
    """Masked-dense in and out, like tcm::submconv_forward; the rows are computed by the Triton kernel."""
    grid, sites = kernel_map(mask)
    rows = conv_rows(_compact(x, mask), grid, sites, weight, bias, tuple(dilation), groups)
    return _dense(rows, mask, x, weight.shape[0])


def submconv_weight_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                                dilation: list[int], groups: int) -> torch.Tensor:
    """dW [Cout, Cin/G, *k] of the masked-dense layout (gathers the active rows, then :func:`weight_grad_rows`)."""
    grid, sites = kernel_map(mask)
    return weight_grad_rows(_compact(x, mask), _compact(grad_out, mask), grid, sites, weight, tuple(dilation), groups)


def submconv_compact_triton(features: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, dilation: list[int], groups: int) -> torch.Tensor:
    """Compact rows in and out, like tcm::submconv_compact_forward: [N, Cin] -> [N, Cout] in features' dtype."""
    return conv_rows(features, grid, sites, weight, bias, tuple(dilation), groups).to(features.dtype)


def submconv_compact_weight_grad_triton(grad_out: torch.Tensor, features: torch.Tensor, grid: torch.Tensor,
                                        sites: torch.Tensor, weight: torch.Tensor, dilation: list[int],
                                        groups: int) -> torch.Tensor:
    """dW [Cout, Cin/G, *k] of the compact layout."""
    return weight_grad_rows(features, grad_out, grid, sites, weight, tuple(dilation), groups)
