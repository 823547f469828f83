"""Triton kernels of the tiled InfoNCE log-sum-exp and its backward.

Logits S = inv_t * x @ y.T for x [M, D], y [N, D] (row-major). Tiles and grid:

* ``_row_lse_kernel``, grid (cdiv(M, BLOCK_M),): one program per BLOCK_M rows of x walks y in
  BLOCK_N-row tiles; each S tile is a sum over D in BLOCK_K chunks of ``tl.dot`` (fp32
  accumulation), folded into an online log-sum-exp (running max m, running sum l). Column
  log-sum-exps are the same kernel with x and y swapped, so nothing ever needs atomics.
* ``_grad_kernel``, grid (cdiv(M, BLOCK_M), cdiv(D, BLOCK_O)): one program per BLOCK_M rows of x
  and BLOCK_O columns of the gradient; it recomputes the S tiles (over the whole D, in BLOCK_K
  chunks) and builds dL/dS = g_x[i] exp(S_ij - lse_x[i]) + g_y[j] exp(S_ij - lse_y[j]) (each term
  switched on by a constexpr), accumulating grad_x[:, cols] = inv_t * dL/dS @ y[:, cols] and the
  per-row partials of <dL/dS, S> (for d loss / d inv_t; written by the programs of column block 0).
  grad_y is the same kernel with the roles swapped. For D > BLOCK_O the S tiles are recomputed
  once per column block (cdiv(D, BLOCK_O) times): the price of keeping the accumulator in
  registers and of needing no O(M N) buffer.

Shared memory and registers do not grow with D: only BLOCK_K-wide chunks of x and y are staged
(``num_stages`` of them, chosen by :func:`choose_config` from the dtype and the device's
shared-memory limit), and the accumulator is BLOCK_M x BLOCK_O.

Precision: fp32 inputs use IEEE fp32 dots (no TF32) so the result matches the CPU kernels;
fp16/bf16 dots run on tensor cores with fp32 accumulation, and dL/dS is rounded to the input dtype
for the second dot, as flash-attention does with its probabilities. The CPU interpreter runs the
same path (``EMULATE_BF16``, see ``_precision``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import launch, shared_memory_limit
from ._precision import dot, emulate_bf16, to_dtype


@triton.jit
def _s_tile(X, Y, rows, row_ok, cols, col_ok, D, stride_x, stride_y,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile x[rows] @ y[cols].T, summed over D in BLOCK_K chunks (zero outside)."""
    x_base = X + rows.to(tl.int64)[:, None] * stride_x  # int64: M * D may exceed 2^31
    y_base = Y + cols.to(tl.int64)[:, None] * stride_y
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        dim_ok = dims < D
        x = tl.load(x_base + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        y = tl.load(y_base + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = dot(x, tl.trans(y), s, EMULATE_BF16)
    return s


@triton.jit
def _row_lse_kernel(
    X, Y,  # x [M, D], y [N, D], unit stride along D
    INV_T,  # pointer to the scalar 1 / temperature
    LSE,  # out: fp32 [M], lse_j S_ij
    M, N, D,  # sizes
    stride_x, stride_y,  # row strides of x and y
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    inv_t = tl.load(INV_T).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _s_tile(X, Y, rows, row_ok, cols, col_ok, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K,
                    EMULATE_BF16) * inv_t
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def _grad_kernel(
    X, Y,  # x [M, D] (rows whose gradient this call computes), y [N, D]
    INV_T,  # pointer to the scalar 1 / temperature
    LSE_X, G_X,  # fp32 [M]: lse of the rows of S and the gradient w.r.t. it (read if X_TERM)
    LSE_Y, G_Y,  # fp32 [N]: lse of the columns of S and the gradient w.r.t. it (read if Y_TERM)
    GRAD_X,  # out: [M, D] in x's dtype, row stride stride_g
    DOT,  # out: fp32 [M], sum_j dL/dS_ij * S_ij (written if WRITE_DOT)
    M, N, D, stride_x, stride_y, stride_g,
    X_TERM: tl.constexpr, Y_TERM: tl.constexpr, WRITE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    out_dims = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = out_dims < D
    inv_t = tl.load(INV_T).to(tl.float32)
    if X_TERM:
        lse_x = tl.load(LSE_X + rows, mask=row_ok, other=0.0)
        g_x = tl.load(G_X + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_O], tl.float32)
    ds_s = tl.zeros([BLOCK_M], tl.float32)  # sum_j dL/dS_ij * S_ij
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _s_tile(X, Y, rows, row_ok, cols, col_ok, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K,
                    EMULATE_BF16) * inv_t
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if X_TERM:
            g += g_x[:, None] * tl.exp(s - lse_x[:, None])
        if Y_TERM:
            lse_y = tl.load(LSE_Y + cols, mask=col_ok, other=0.0)
            g_y = tl.load(G_Y + cols, mask=col_ok, other=0.0)
            g += g_y[None, :] * tl.exp(s - lse_y[None, :])
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        if WRITE_DOT:
            ds_s += tl.sum(g * s, 1)
        y_out = tl.load(Y + cols.to(tl.int64)[:, None] * stride_y + out_dims[None, :],
                        mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        acc = dot(to_dtype(g, Y.dtype.element_ty, EMULATE_BF16), y_out, acc, EMULATE_BF16)
    grad = acc * inv_t
    tl.store(GRAD_X + rows.to(tl.int64)[:, None] * stride_g + out_dims[None, :],
             to_dtype(grad, GRAD_X.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & out_ok[None, :])
    if WRITE_DOT:
        if tl.program_id(1) == 0:
            tl.store(DOT + rows, ds_s, mask=row_ok)


class Config(NamedTuple):
    """Tiles and launch options of one info_nce kernel launch."""

    block_m: int  # rows of x per program
    block_n: int  # rows of y per S tile
    block_k: int  # chunk of D per dot
    block_o: int  # gradient columns per program (backward)
    num_warps: int
    num_stages: int


MAX_BLOCK = 128  # largest block_size: a 128 x 128 fp32 S tile already takes 128 registers per thread at 4 warps
_CHUNK_BYTES = 64
_BLOCK_O = 128


def shared_memory_estimate(cfg: Config, itemsize: int, backward: bool) -> int:
    """Upper bound (bytes) of the kernel's shared memory: ``num_stages - 1`` staged x/y chunks (and, backward,
    the y columns of the gradient dot) plus one fp32 tile of scratch for layout conversions. The compile
    sweep in tests/ops/test_info_nce.py checks it against Triton's ``metadata.shared``."""
    staged = (cfg.block_m + cfg.block_n) * cfg.block_k
    scratch = cfg.block_m * cfg.block_n * 4
    if backward:
        staged += cfg.block_n * cfg.block_o
        scratch = max(scratch, cfg.block_m * cfg.block_o * 4)
    # Triton's software pipeline keeps num_stages - 1 loads in flight
    return max(cfg.num_stages - 1, 1) * staged * itemsize + scratch


def choose_config(d: int, dtype: torch.dtype, shared_limit: int, backward: bool, block: int = 0) -> Config:
    """Tiles and stages for feature size ``d``: the most pipeline stages (3, 2, 1) whose
    :func:`shared_memory_estimate` fits ``shared_limit`` bytes (halving the backward's BLOCK_O if none does); ``block`` rows per tile (0: 64, 32 for the fp32
    backward). The compile sweep in tests/ops/test_info_nce.py checks every default choice on sm_80/sm_90."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if block == 0:  # the fp32 backward's two FMA dots spill at 64 rows on sm_80 (compile sweep)
        block = 32 if backward and itemsize == 4 else 64
    if block < 16 or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"info_nce: block_size must be a power of two in [16, {MAX_BLOCK}] on the Triton back "
                         f"end, got {block}")
    width = max(16, triton.next_power_of_2(d))
    # 64-byte rows per chunk: fp32 dots run on FMA units with both operands in registers, and wider
    # chunks made them spill (compile sweep of tests/ops/test_info_nce.py)
    block_k, block_o = min(_CHUNK_BYTES // itemsize, width), min(_BLOCK_O, width)
    while True:  # narrower gradient column blocks only where the device's shared memory asks for them
        warps = 8 if block * max(block, block_k, block_o if backward else 0) >= 64 * 64 else 4
        for stages in (3, 2, 1):
            cfg = Config(block, block, block_k, block_o, warps, stages)
            if shared_memory_estimate(cfg, itemsize, backward) <= shared_limit:
                return cfg
        if not backward or block_o <= 16:
            break
        block_o //= 2
    raise ValueError(f"info_nce: block_size {block} needs {shared_memory_estimate(cfg, itemsize, backward)} B of "
                     f"shared memory, this device has {shared_limit} B; use a smaller block_size")


def _row_lse(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, block: int) -> torch.Tensor:
    m, d = x.shape
    cfg = choose_config(d, x.dtype, shared_memory_limit(x.device), False, block)
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    launch("info_nce", _row_lse_kernel, (triton.cdiv(m, cfg.block_m),), x.device,
           x, y, inv_t, out, m, y.shape[0], d, x.stride(0), y.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           BLOCK_K=cfg.block_k, EMULATE_BF16=emulate_bf16(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _check(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or y.dtype != x.dtype:
        raise TypeError(f"info_nce: the Triton back end takes float32/float16/bfloat16 inputs of one dtype, got "
                        f"{x.dtype} and {y.dtype}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or inv_t.numel() != 1:
        raise ValueError(f"info_nce: x, y must be [M, D], [N, D] and inv_t one value, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(inv_t.shape)}")


def info_nce_lse_triton(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, with_col: bool,
                        block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``tcm::info_nce_lse`` (block 0 = chosen from D)."""
    _check(x, y, inv_t)
    x, y, inv_t = x.contiguous(), y.contiguous(), inv_t.contiguous()
    row_lse = _row_lse(x, y, inv_t, block)
    col_lse = _row_lse(y, x, inv_t, block) if with_col else x.new_empty(0, dtype=torch.float32)
    return row_lse, col_lse


def _grad_rows(x, y, inv_t, lse_x, g_x, lse_y, g_y, x_term, y_term, dot, block):
    m, d = x.shape
    cfg = choose_config(d, x.dtype, shared_memory_limit(x.device), True, block)
    grad = torch.empty_like(x)
    # Terms that are switched off are never read; any fp32 tensor fills their slots.
    lse_x, g_x = (lse_x, g_x) if x_term else (inv_t, inv_t)
    lse_y, g_y = (lse_y, g_y) if y_term else (inv_t, inv_t)
    launch("info_nce", _grad_kernel, (triton.cdiv(m, cfg.block_m), triton.cdiv(d, cfg.block_o)), x.device,
           x, y, inv_t, lse_x, g_x, lse_y, g_y, grad, inv_t if dot is None else dot, m, y.shape[0], d,
           x.stride(0), y.stride(0), grad.stride(0), X_TERM=x_term, Y_TERM=y_term, WRITE_DOT=dot is not None,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_O=cfg.block_o,
           EMULATE_BF16=emulate_bf16(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad


def info_nce_lse_backward_triton(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, row_lse: torch.Tensor,
                                 col_lse: torch.Tensor, grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor,
                                 block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``tcm::info_nce_lse_backward``: (grad_x, grad_y, grad_inv_t)."""
    _check(x, y, inv_t)
    x, y, inv_t = x.contiguous(), y.contiguous(), inv_t.contiguous()
    with_col = col_lse.numel() > 0
    f32 = dict(dtype=torch.float32)
    r, gr = row_lse.to(**f32).contiguous(), grad_row_lse.to(**f32).contiguous()
    c, gc = col_lse.to(**f32).contiguous(), grad_col_lse.to(**f32).contiguous()
    dot = torch.empty(x.shape[0], device=x.device, **f32)
    grad_x = _grad_rows(x, y, inv_t, r, gr, c, gc, True, with_col, dot, block)
    grad_y = _grad_rows(y, x, inv_t, c, gc, r, gr, with_col, True, None, block)
    grad_inv_t = (dot.sum() / inv_t.to(**f32)).to(inv_t.dtype).reshape(inv_t.shape)
    return grad_x, grad_y, grad_inv_t
