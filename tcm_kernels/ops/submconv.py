"""Submanifold sparse convolution (2-D and 3-D) and SparK's sparse downsampling.

Layout: masked-dense (SparK). ``x`` [B, C, *S] holds features, ``mask`` bool
[B, 1, *S] says which sites are active. The result equals the dense reference
``conv(x * mask) * mask`` ("same" padding, stride 1), but the compiled engine
only touches active sites:

1. kernel map: a dense int32 grid with the compact row of every active site (-1
   elsewhere), so a neighbour is one bounds check and one load, no hash;
2. the active features are gathered into a compact channels-last matrix
   X [N_active, C] (fp32 accumulation for fp16/bf16 inputs);
3. implicit GEMM: active rows are cut into cache-sized chunks; each chunk's
   im2col block [R, k^d C/groups] is gathered through the grid and multiplied by
   the weight with one GEMM per group (depthwise: a direct vectorised loop);
4. the compact result is scattered back to the dense output.

Backward: the input gradient is the same engine run on ``grad_out`` with the
flipped, in/out-transposed kernel (the neighbour relation is symmetric, so no
atomics are needed); the weight gradient sums ``A^T G`` over chunks in a fixed,
shape-determined number of partitions, added in order: deterministic.

Patch-aligned masks have a second path (``path="patch"``, ``_patch_block.py`` and
``triton/submconv_patch.py``): dense tiles with halos, one dense conv over them; ``path="auto"``
picks it where it was measured faster (``_patch_block.prefer_patch_path``).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from ..reference import submconv as _ref
from . import _patch_block

_OP = "submanifold_conv"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(op: str, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  groups: int) -> int:
    check_tensor(op, "x", x, ndim=(4, 5), dtypes=_DTYPES)
    nd = x.dim() - 2
    check_tensor(op, "mask", mask, dtypes=(torch.bool,))
    if tuple(mask.shape) != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(f"{op}: mask must be [B, 1, *S] = {(x.shape[0], 1, *x.shape[2:])}, got shape "
                         f"{tuple(mask.shape)}")
    check_tensor(op, "weight", weight, ndim=nd + 2, dtypes=(x.dtype,))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    cin, cout = x.shape[1], weight.shape[0]
    if cin % groups or cout % groups or weight.shape[1] * groups != cin:
        raise ValueError(f"{op}: weight must be [Cout, Cin/groups, *k] with Cin={cin} and Cout divisible by "
                         f"groups={groups}, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(x.dtype,))
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias must be [Cout={cout}], got shape {tuple(bias.shape)}")
        check_same_device(op, x=x, mask=mask, weight=weight, bias=bias)
    else:
        check_same_device(op, x=x, mask=mask, weight=weight)
    return nd


def _check_dilation(dilation: int | tuple[int, ...], nd: int) -> list[int]:
    dil = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    if len(dil) != nd or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dil):
        raise ValueError(f"{_OP}: dilation must be a positive int or {nd} positive ints, got {dilation!r}")
    return dil


def transposed_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[Cout, Cin/g, *k] -> [Cin, Cout/g, *k] flipped: the kernel whose submanifold conv of grad_out is grad_x."""
    cout, cin_g, *k = weight.shape
    nd = len(k)
    w = weight.reshape(groups, cout // groups, cin_g, *k).transpose(1, 2).reshape(cin_g * groups, cout // groups, *k)
    return w.flip(dims=tuple(range(2, 2 + nd)))


@torch.library.register_fake("tcm::submconv_forward")
def _forward_fake(x, mask, weight, bias, dilation, groups, chunk_rows):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))


@torch.library.register_fake("tcm::submconv_weight_grad")
def _weight_grad_fake(grad_out, x, mask, weight, dilation, groups, chunk_rows):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("tcm::submconv_kernel_map")
def _kernel_map_fake(mask):
    n = torch.library.get_ctx().new_dynamic_size()
    return (mask.new_empty((mask.shape[0], *mask.shape[2:]), dtype=torch.int32),
            mask.new_empty((n,), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, dilation, groups, chunk_rows = inputs
    ctx.save_for_backward(x, mask, weight)
    ctx.has_bias = bias is not None
    ctx.conf = (list(dilation), groups, chunk_rows)


def _backward(ctx, grad_out):
    x, mask, weight = ctx.saved_tensors
    dilation, groups, chunk_rows = ctx.conf
    grad_out = grad_out.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.tcm.submconv_forward(grad_out, mask, transposed_kernel(weight, groups), None, dilation,
                                                groups, chunk_rows)
    if ctx.needs_input_grad[2]:
        grad_w = torch.ops.tcm.submconv_weight_grad(grad_out, x, mask, weight, dilation, groups, chunk_rows)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dims = [0, *range(2, grad_out.dim())]
        grad_b = (grad_out.float() * mask).sum(dims).to(grad_out.dtype)
    return grad_x, None, grad_w, grad_b, None, None, None


torch.library.register_autograd("tcm::submconv_forward", _backward, setup_context=_setup_context)


def submanifold_conv(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     dilation: int | tuple[int, ...] = 1, groups: int = 1, patch_size: int | None = None,
                     backend: str | None = None, chunk_rows: int = 0, path: str = "auto") -> torch.Tensor:
    """Submanifold sparse convolution on the masked-dense layout.

    Args:
        x: float [B, Cin, H, W] or [B, Cin, D, H, W] (fp32/fp16/bf16; fp64 on the
            reference). Values at inactive sites are ignored. Any strides
            (channels-last included).
        mask: bool [B, 1, *S], True = active site.
        weight: [Cout, Cin/groups, *k], odd k (1, 3, 5, 7, ...), dtype of x.
        bias: optional [Cout].
        dilation: int or one per spatial dim; padding is "same" = dilation * (k - 1) / 2.
        groups: grouped / depthwise convolution (groups = Cin).
        patch_size: hint that the mask is made of aligned p^d blocks at this scale
            (MIM masks). Validated (ValueError when p does not divide S or a patch is
            partly active); it makes the patch-block path available.
        backend: ``"reference" | "cpu" | "triton" | "cuda"``; default: the compiled engine
            on CPU tensors, the Triton implicit GEMM on CUDA tensors (``"cuda"``: CUDA kernel
            map / gathers + cuBLAS GEMMs, compile-checked only).
        chunk_rows: active rows per implicit-GEMM block (0 = sized to the L2 cache).
        path: ``"generic"`` (implicit GEMM over the kernel map, any mask), ``"patch"``
            (dense tiles with halos, one dense conv over all active patches; needs
            ``patch_size``) or ``"auto"``: the patch-block path when ``patch_size`` is given
            and :func:`tcm_kernels.ops._patch_block.prefer_patch_path` says it is the faster
            one for (back end, d, p, kernel, groups), the generic path otherwise
            (rule and measurements: docs/submconv.md). Ignored by ``backend="reference"``.

    Returns:
        [B, Cout, *S] in x's dtype, contiguous; exactly 0 at inactive sites. Equals
        ``conv(x * mask) * mask`` of the dense reference.
    """
    nd = _check_inputs(_OP, x, mask, weight, bias, groups)
    dil = _check_dilation(dilation, nd)
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"{_OP}: kernel size must be odd, got weight shape {tuple(weight.shape)}")
    if patch_size is not None:
        _check_patch_alignment(mask, patch_size)
    chosen = _choose(x, backend)
    use_patch = _patch_block.use_patch_path(path, chosen, x, weight, dil, groups, patch_size)
    if chosen == "reference":
        return _ref.submanifold_conv(x, mask, weight, bias, dilation=tuple(dil), groups=groups)
    if use_patch and chosen == "triton":
        from ..triton.submconv_patch import submconv_patch_triton

        return submconv_patch_triton(x, mask, weight, bias, dil, groups, patch_size)
    if use_patch:
        return _patch_block.submconv_patch(x, mask, weight, bias, dil, groups, patch_size)
    if chosen == "triton":
        from ..triton.submconv import submconv_triton

        return submconv_triton(x, mask, weight, bias, dil, groups)
    return torch.ops.tcm.submconv_forward(x, mask, weight, bias, dil, groups, chunk_rows)


def _choose(x: torch.Tensor, backend: str | None) -> str:
    chosen = _backend.choose_backend("submconv_forward", x.device, backend, has_cuda_kernel=True)
    if chosen != "reference" and x.dtype not in _COMPILED_DTYPES:
        if backend is not None:
            raise TypeError(f"{_OP}: backend={backend!r} supports float32/float16/bfloat16, got "
                            f"{str(x.dtype).replace('torch.', '')}")
        return "reference"
    return chosen


def _check_patch_alignment(mask: torch.Tensor, patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{_OP}: patch_size must be a positive int, got {patch_size!r}")
    if torch.compiler.is_compiling():
        return  # data-dependent check; eager mode runs it
    if not is_patch_aligned(mask, patch_size):
        raise ValueError(f"{_OP}: mask must be aligned to patches of size {patch_size} (patch_size hint), "
                         "got a mask that is not")


def is_patch_aligned(mask: torch.Tensor, patch_size: int) -> bool:
    """Whether every aligned ``patch_size``^d block of ``mask`` [B, 1, *S] is all-on or all-off (O(S))."""
    spatial = mask.shape[2:]
    if any(s % patch_size for s in spatial):
        return False
    coarse = _ref.downsample_mask(mask, patch_size)
    up = coarse
    for dim in range(2, mask.dim()):
        up = up.repeat_interleave(patch_size, dim=dim)
    return bool(torch.equal(up, mask))


def sparse_downsample(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparK's downsampling between stages: conv with kernel = stride, output mask = max-pool of the mask.

    Args:
        x: [B, Cin, *S]; mask: bool [B, 1, *S]; weight: [Cout, Cin/groups, *(stride,)*d]
            (kernel = stride); bias: optional [Cout]; stride: int, divides every S.

    Returns:
        (y [B, Cout, *(S / stride)], mask_out bool [B, 1, *(S / stride)]) with y = 0 where mask_out is False.
        Non-overlapping windows: the dense strided conv of the masked input does no wasted work
        beyond the inactive windows, so it is the implementation (oneDNN on CPU).
    """
    op = "sparse_downsample"
    nd = _check_inputs(op, x, mask, weight, bias, 1)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{op}: stride must be a positive int, got {stride!r}")
    if tuple(weight.shape[2:]) != (stride,) * nd:
        raise ValueError(f"{op}: weight kernel must equal the stride {(stride,) * nd}, got shape {tuple(weight.shape)}")
    if any(s % stride for s in x.shape[2:]):
        raise ValueError(f"{op}: stride {stride} must divide the spatial shape {tuple(x.shape[2:])}")
    return _ref.sparse_downsample(x, mask, weight, bias, stride=stride)
