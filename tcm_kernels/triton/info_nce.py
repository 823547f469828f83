"""Triton kernels of the tiled InfoNCE log-sum-exp and its backward.

Logits S = inv_t * x @ y.T for x [M, D], y [N, D] (row-major). Tiles and grid:

* ``_row_lse_kernel``: one program per BLOCK_M rows of x; the whole (padded) D of
  those rows stays in registers while the program walks y in BLOCK_N-row tiles,
  computing S tiles with ``tl.dot`` (fp32 accumulation) and folding them into an
  online log-sum-exp (running max m, running sum l). Column log-sum-exps are the
  same kernel with x and y swapped, so nothing ever needs atomics.
* ``_grad_kernel``: one program per BLOCK_M rows of x; recomputes the S tiles and
  builds dL/dS = g_x[i] exp(S_ij - lse_x[i]) + g_y[j] exp(S_ij - lse_y[j]) (each
  term switched on by a constexpr), accumulating grad_x = inv_t * dL/dS @ y and the
  per-row partials of <dL/dS, S> (for d loss / d inv_t). grad_y is the same kernel
  with the roles swapped.

Memory: O((M + N) D) for inputs and gradients; each program holds BLOCK_M x BLOCK_D
plus BLOCK_M x BLOCK_N values. fp32 inputs use IEEE fp32 dots (no TF32) so the
result matches the CPU kernels; fp16/bf16 dots run on tensor cores with fp32
accumulation, and dL/dS is rounded to the input dtype for the second dot, as
flash-attention does with its probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting


@triton.jit
def _load_rows(PTR, idx, ok, stride, dims, dim_ok, UPCAST: tl.constexpr):
    """Rows ``idx`` of a [rows, D] matrix as a [len(idx), BLOCK_D] tile, zero outside; fp32 if UPCAST."""
    t = tl.load(PTR + idx[:, None] * stride + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _row_lse_kernel(
    X, Y,  # x [M, D], y [N, D], unit stride along D
    INV_T,  # pointer to the scalar 1 / temperature
    LSE,  # out: fp32 [M], lse_j S_ij
    M, N, D,  # sizes
    stride_x, stride_y,  # row strides of x and y
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    dim_ok = dims < D
    x = _load_rows(X, rows, row_ok, stride_x, dims, dim_ok, UPCAST)
    inv_t = tl.load(INV_T).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        y = _load_rows(Y, cols, col_ok, stride_y, dims, dim_ok, UPCAST)
        s = tl.dot(x, tl.trans(y), input_precision="ieee") * inv_t
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    dim_ok = dims < D
    x = _load_rows(X, rows, row_ok, stride_x, dims, dim_ok, UPCAST)
    inv_t = tl.load(INV_T).to(tl.float32)
    if X_TERM:
        lse_x = tl.load(LSE_X + rows, mask=row_ok, other=0.0)
        g_x = tl.load(G_X + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dot = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        y = _load_rows(Y, cols, col_ok, stride_y, dims, dim_ok, UPCAST)
        s = tl.dot(x, tl.trans(y), input_precision="ieee") * inv_t
        g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if X_TERM:
            g += g_x[:, None] * tl.exp(s - lse_x[:, None])
        if Y_TERM:
            lse_y = tl.load(LSE_Y + cols, mask=col_ok, other=0.0)
            g_y = tl.load(G_Y + cols, mask=col_ok, other=0.0)
            g += g_y[None, :] * tl.exp(s - lse_y[None, :])
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        if WRITE_DOT:
            dot += tl.sum(g * s, 1)
        acc += tl.dot(g.to(y.dtype), y, input_precision="ieee")
    grad = acc * inv_t
    tl.store(GRAD_X + rows[:, None] * stride_g + dims[None, :], grad.to(GRAD_X.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    if WRITE_DOT:
        tl.store(DOT + rows, dot, mask=row_ok)


def block_sizes(d: int, block: int) -> tuple[int, int]:
    """(BLOCK_MN, BLOCK_D): rows/cols per tile (``block``, or chosen so the register tiles stay small)."""
    block_d = max(16, triton.next_power_of_2(d))
    if block == 0:
        block = 64 if block_d <= 128 else 32 if block_d <= 512 else 16
    if block < 16 or block & (block - 1):
        raise ValueError(f"info_nce: block_size must be a power of two >= 16 on the Triton back end, got {block}")
    return block, block_d


def _upcast(x: torch.Tensor) -> bool:
    # The interpreter's bf16 arithmetic is unreliable: do the math in fp32 there.
    return triton_interpreting() and x.dtype == torch.bfloat16


def _row_lse(x: torch.Tensor, y: torch.Tensor, inv_t: torch.Tensor, block: int) -> torch.Tensor:
    m, d = x.shape
    bmn, bd = block_sizes(d, block)
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    _row_lse_kernel[(triton.cdiv(m, bmn),)](x, y, inv_t, out, m, y.shape[0], d, x.stride(0), y.stride(0),
                                            BLOCK_M=bmn, BLOCK_N=bmn, BLOCK_D=bd, UPCAST=_upcast(x))
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
    bmn, bd = block_sizes(d, block)
    grad = torch.empty_like(x)
    # Terms that are switched off are never read; any fp32 tensor fills their slots.
    lse_x, g_x = (lse_x, g_x) if x_term else (inv_t, inv_t)
    lse_y, g_y = (lse_y, g_y) if y_term else (inv_t, inv_t)
    _grad_kernel[(triton.cdiv(m, bmn),)](
        x, y, inv_t, lse_x, g_x, lse_y, g_y, grad, inv_t if dot is None else dot, m, y.shape[0], d,
        x.stride(0), y.stride(0), grad.stride(0), X_TERM=x_term, Y_TERM=y_term, WRITE_DOT=dot is not None,
        BLOCK_M=bmn, BLOCK_N=bmn, BLOCK_D=bd, UPCAST=_upcast(x))
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
