"""Triton tile kernel of the submanifold convolution's patch-block path (mask aligned to p^d patches).

Tiles and grid
--------------
The T active patches are listed once (``tiles`` int32 [T, 4] = (b, gz, gy, gx), from the coarse
mask; no per-site kernel map). Rows of the implicit GEMM are the T * p^d sites of those patches,
read and written **in place in the masked-dense tensors**: no compact gather, no scatter. One
program computes a BLOCK_M x BLOCK_N tile of the output for one group::

    row r -> patch r // p^d, local offset r % p^d -> site (b, z, y, x)
    for tap k in 0..K-1:                                  # K = k^d kernel taps
        n = site + offset_k                               # halo: a neighbouring patch (or the border)
        on = inside(n) and mask[b, n]                     # an inactive neighbour reads 0
        for c0 in 0..Cin/G step BLOCK_K:
            acc += x[b, c0:c0+BLOCK_K, n] @ Wg[g, k, c0:c0+BLOCK_K, cols]
    y[b, cols, site] = acc (+ bias)

grid = (cdiv(T * p^d, BLOCK_M), cdiv(Cout/G, BLOCK_N), G). Each output element is owned by one
program: no atomics, deterministic. x may have any strides; the mask is read as bytes. ``tl.dot``
runs in x's dtype with fp32 accumulation, as in ``submconv`` (tensor cores for fp16/bf16, IEEE fp32
for fp32). Rows and sites are int64. Inactive patches of y stay at the zeros it is allocated with.

Backward: the input gradient is the same kernel on grad_out with the flipped, in/out-transposed
kernel; the weight gradient is one GEMM per tap and group over the tiles (``tiles_x[tap]^T G``,
torch, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.geometry import halo
from .._core.patch_tiles import active_patches, centre_tiles, gather_tiles, padded_channels_last
from ._launch import launch
from ._precision import dot, emulate_bf16
from .submconv import gemm_weight, launch_tiles, tap_offsets


@triton.jit
def _submconv_patch_kernel(
    x_ptr,  # [B, CIN, D, H, W] masked-dense input (fp32/fp16/bf16), strides sxb..sxx
    mask_ptr,  # int8 [B, D, H, W] contiguous: 1 = active site
    w_ptr,  # [G, K, CIN_G, COUT_G] weight in x's dtype, GEMM layout
    bias_ptr,  # fp32 [COUT] (read only when HAS_BIAS)
    y_ptr,  # fp32 [B, COUT, D, H, W] contiguous output, zeros outside the active patches
    tiles_ptr,  # int32 [T, 4] (b, gz, gy, gx) of every active patch
    offsets_ptr,  # int32 [K, 3] tap displacements (dz, dy, dx), dilation included
    n_rows, depth, height, width, sxb, sxc, sxz, sxy, sxx, cin, cout, cin_g, cout_g, taps, pz, py, px,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # int64 rows and sites: a volume may exceed 2^31 sites
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    per_tile = pz * py * px
    tile = tl.where(row_ok, rows // per_tile, 0)
    local = rows % per_tile
    bs = tl.load(tiles_ptr + 4 * tile, mask=row_ok, other=0)
    zs = tl.load(tiles_ptr + 4 * tile + 1, mask=row_ok, other=0) * pz + local // (py * px)
    ys = tl.load(tiles_ptr + 4 * tile + 2, mask=row_ok, other=0) * py + (local // px) % py
    xs = tl.load(tiles_ptr + 4 * tile + 3, mask=row_ok, other=0) * px + local % px
    bs64 = bs.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < cout_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(taps):
        z = zs + tl.load(offsets_ptr + 3 * k)
        y = ys + tl.load(offsets_ptr + 3 * k + 1)
        x = xs + tl.load(offsets_ptr + 3 * k + 2)
        inside = row_ok & (z >= 0) & (z < depth) & (y >= 0) & (y < height) & (x >= 0) & (x < width)
        site = ((bs64 * depth + z) * height + y) * width + x
        on = tl.load(mask_ptr + site, mask=inside, other=0) != 0
        base = bs64 * sxb + z.to(tl.int64) * sxz + y.to(tl.int64) * sxy + x.to(tl.int64) * sxx
        for c0 in range(0, cin_g, BLOCK_K):
            ks = c0 + tl.arange(0, BLOCK_K)
            k_ok = ks < cin_g
            a = tl.load(x_ptr + base[:, None] + (grp * cin_g + ks).to(tl.int64)[None, :] * sxc,
                        mask=on[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ((grp * taps + k) * cin_g + ks[:, None]) * cout_g + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot(a, w, acc, EMULATE_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + grp * cout_g + cols, mask=col_ok, other=0.0)[None, :]
    plane = tl.cast(depth, tl.int64) * height * width
    out_site = (zs * height + ys) * width + xs
    ch = (bs64 * cout)[:, None] + (grp * cout_g + cols)[None, :]
    tl.store(y_ptr + ch * plane + out_site[:, None], acc, mask=row_ok[:, None] & col_ok[None, :])


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 5 else t.unsqueeze(2)


def conv_patches(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """fp32 [B, Cout, *S]: the patch-block submanifold conv of x [B, Cin, *S] (launches the kernel)."""
    patches = active_patches(mask, patch)
    nd = x.dim() - 2
    cout, cin_g, *kernel = weight.shape
    cout_g = cout // groups
    y = torch.zeros((x.shape[0], cout, *x.shape[2:]), device=x.device, dtype=torch.float32)
    n_tiles = patches[0].numel()
    if n_tiles == 0:
        return y
    tiles = torch.stack([patches[0], *(torch.zeros_like(patches[0]),) * (3 - nd), *patches[1:]], 1).to(torch.int32)
    taps = 1
    for k in kernel:
        taps *= k
    x5, m5 = _as_5d(x), _as_5d(mask)[:, 0].contiguous().view(torch.int8)
    depth, height, width = x5.shape[2:]
    pz, py, px = (1,) * (3 - nd) + (patch,) * nd
    wg = gemm_weight(weight, groups, x.dtype)
    offsets = tap_offsets(tuple(kernel), tuple(dilation), x.device)
    n_rows = n_tiles * pz * py * px
    block_m, block_n, block_k, warps = launch_tiles(cin_g, cout_g, x.dtype)
    b32 = bias.float().contiguous() if bias is not None else y  # dummy pointer when there is no bias
    launch("submanifold_conv", _submconv_patch_kernel,
           (triton.cdiv(n_rows, block_m), triton.cdiv(cout_g, block_n), groups), x.device,
           x5, m5, wg, b32, y, tiles, offsets, n_rows, depth, height, width, *x5.stride(), x.shape[1], cout, cin_g,
           cout_g, taps, pz, py, px, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
           EMULATE_BF16=emulate_bf16(x.dtype), num_warps=warps)
    return y


def submconv_patch_triton(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          dilation: list[int], groups: int, patch: int) -> torch.Tensor:
    """Masked-dense in and out, like the generic Triton launcher; rows are the sites of the active patches."""
    return conv_patches(x, mask, weight, bias, dilation, groups, patch).to(x.dtype)


def submconv_patch_weight_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                                      weight: torch.Tensor, dilation: list[int], groups: int,
                                      patch: int) -> torch.Tensor:
    """dW [Cout, Cin/G, *k] = sum over the tiles' sites of G^T X[tap], one GEMM per tap and group."""
    patches = active_patches(mask, patch)
    cout, cin_g, *kernel = weight.shape
    cout_g = cout // groups
    dw = torch.zeros((cout, cin_g, *kernel), device=x.device, dtype=torch.float32)
    if patches[0].numel() == 0:
        return dw.to(weight.dtype)
    pad = halo(kernel, dilation)
    tiles = gather_tiles(padded_channels_last(x, mask, pad, torch.float32), patches,
                                      patch, pad)  # [T, Cin, *(p + 2r)]
    g = centre_tiles(grad_out, patches, patch, torch.float32)  # [T, Cout, *p]
    g = g.movedim(1, -1).reshape(-1, cout)
    for tap in torch.cartesian_prod(*(torch.arange(k) for k in kernel)).reshape(-1, len(kernel)).tolist():
        window = tiles[(slice(None), slice(None), *(slice(t * d, t * d + patch) for t, d in zip(tap, dilation)))]
        a = window.movedim(1, -1).reshape(-1, tiles.shape[1])  # [T * p^d, Cin]
        for grp in range(groups):
            gs = g[:, grp * cout_g:(grp + 1) * cout_g]
            dw[(slice(grp * cout_g, (grp + 1) * cout_g), slice(None), *tap)] = \
                gs.t() @ a[:, grp * cin_g:(grp + 1) * cin_g]
    return dw.to(weight.dtype)
