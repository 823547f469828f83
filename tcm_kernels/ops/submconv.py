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

Compact layout (:func:`submanifold_conv_compact`): features [N, C] plus a
:class:`~tcm_kernels.sparse_tensor.KernelMap` (grid, sites) run step 3 alone, with
no gather/scatter; the masked-dense op is that engine wrapped in steps 1, 2 and 4.
Patch-aligned masks have a second path (``path="patch"``, ``_patch_block.py`` and
``triton/submconv_patch.py``): dense tiles with halos, one dense conv over them; ``path="auto"``
picks it where it was measured faster (``_patch_block.prefer_patch_path``).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._autocast import autocast_rule
from .._checks import check_same_device, check_tensor
from ..reference import submconv as _ref
from ..sparse_tensor import KernelMap, SparseTensor
from . import _patch_block
from ._conv_autograd import setup_conv_context

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
    _check_weight_bias(op, weight, bias, groups, x.shape[1], x.dtype, nd)
    check_same_device(op, x=x, mask=mask, weight=weight, **({} if bias is None else {"bias": bias}))
    return nd


def _check_weight_bias(op: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, cin: int,
                       dtype: torch.dtype, nd: int) -> None:
    """weight [Cout, Cin/groups, *k] (d = nd) and bias [Cout], both of ``dtype``; groups a positive int."""
    check_tensor(op, "weight", weight, ndim=nd + 2, dtypes=(dtype,))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    cout = weight.shape[0]
    if cin % groups or cout % groups or weight.shape[1] * groups != cin:
        raise ValueError(f"{op}: weight must be [Cout, Cin/groups, *k] with Cin={cin} and Cout divisible by "
                         f"groups={groups}, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=(dtype,))
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias must be [Cout={cout}], got shape {tuple(bias.shape)}")


def _check_dilation(dilation: int | tuple[int, ...], nd: int, op: str = _OP) -> list[int]:
    dil = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    if len(dil) != nd or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dil):
        raise ValueError(f"{op}: dilation must be a positive int or {nd} positive ints, got {dilation!r}")
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


torch.library.register_autograd("tcm::submconv_forward", _backward, setup_context=setup_conv_context)


@autocast_rule("lowp")
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


def _choose(x: torch.Tensor, backend: str | None, compiled_op: str = "submconv_forward", op: str = _OP) -> str:
    chosen = _backend.choose_backend(compiled_op, x.device, backend, has_cuda_kernel=compiled_op == "submconv_forward")
    if chosen != "reference" and x.dtype not in _COMPILED_DTYPES:
        if backend is not None:
            raise TypeError(f"{op}: backend={backend!r} supports float32/float16/bfloat16, got "
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


@autocast_rule("lowp")
def sparse_downsample(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                      stride: int, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparK's downsampling between stages: conv with kernel = stride, output mask = max-pool of the mask.

    A conv with kernel = stride = s is a space-to-depth of the masked input followed by a 1x1 conv
    with ``weight.reshape(Cout, Cin * s^d, 1, ...)``; that 1x1 conv runs as a submanifold conv at the
    output mask, so the GEMM only covers active output windows.

    Args:
        x: [B, Cin, *S]; mask: bool [B, 1, *S]; weight: [Cout, Cin, *(stride,)*d] (kernel = stride);
            bias: optional [Cout]; stride: int, divides every S.
        backend: ``"reference"`` (the dense strided conv of the masked input) or a
            :func:`submanifold_conv` back end for the 1x1 conv (default: its choice).

    Returns:
        (y [B, Cout, *(S / stride)], mask_out bool [B, 1, *(S / stride)]) with y = 0 where mask_out is False.
    """
    op = "sparse_downsample"
    nd = _check_inputs(op, x, mask, weight, bias, 1)
    _check_stride(op, stride, weight, tuple(x.shape[2:]), nd)
    if backend == "reference":
        return _ref.sparse_downsample(x, mask, weight, bias, stride=stride)
    mask_out = _ref.downsample_mask(mask, stride)
    cols = space_to_depth(torch.where(mask, x, 0), stride)
    y = submanifold_conv(cols, mask_out, weight.reshape(weight.shape[0], -1, *(1,) * nd), bias, backend=backend)
    return y, mask_out


def _check_stride(op: str, stride: int, weight: torch.Tensor, spatial: tuple[int, ...], nd: int) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{op}: stride must be a positive int, got {stride!r}")
    if tuple(weight.shape[2:]) != (stride,) * nd:
        raise ValueError(f"{op}: weight kernel must equal the stride {(stride,) * nd}, got shape {tuple(weight.shape)}")
    if any(s % stride for s in spatial):
        raise ValueError(f"{op}: stride {stride} must divide the spatial shape {spatial}")


def space_to_depth(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, C, *S] -> [B, C * s^d, *(S / s)], channel c * s^d + (row-major offset in the s^d window).

    The channel order of ``weight.reshape(Cout, Cin * s^d)`` for a [Cout, Cin, s, ..., s] kernel, so a
    conv with kernel = stride = s equals a 1x1 conv of this (pixel_unshuffle for any d).
    """
    b, c, *spatial = x.shape
    nd = len(spatial)
    split = [v for size in spatial for v in (size // stride, stride)]
    window_dims = [3 + 2 * i for i in range(nd)]
    coarse_dims = [2 + 2 * i for i in range(nd)]
    return (x.reshape(b, c, *split).permute(0, 1, *window_dims, *coarse_dims)
            .reshape(b, c * stride**nd, *(size // stride for size in spatial)))


# ---- compact layout ---------------------------------------------------------------------------------------

_COMPACT_OP = "submanifold_conv_compact"


def _check_compact_inputs(features: torch.Tensor, kernel_map: KernelMap, weight: torch.Tensor,
                          bias: torch.Tensor | None, groups: int) -> int:
    op = _COMPACT_OP
    check_tensor(op, "features", features, ndim=2, dtypes=_DTYPES)
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
    _check_weight_bias(op, weight, bias, groups, features.shape[1], features.dtype, nd)
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"{op}: kernel size must be odd, got weight shape {tuple(weight.shape)}")
    check_same_device(op, features=features, grid=grid, sites=sites, weight=weight,
                      **({} if bias is None else {"bias": bias}))
    return nd


@torch.library.register_fake("tcm::submconv_compact_forward")
def _compact_forward_fake(features, grid, sites, weight, bias, dilation, groups, chunk_rows):
    return features.new_empty((features.shape[0], weight.shape[0]))


@torch.library.register_fake("tcm::submconv_compact_weight_grad")
def _compact_weight_grad_fake(grad_out, features, grid, sites, weight, dilation, groups, chunk_rows):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _compact_setup_context(ctx, inputs, output):
    features, grid, sites, weight, bias, dilation, groups, chunk_rows = inputs
    ctx.save_for_backward(features, grid, sites, weight)
    ctx.has_bias = bias is not None
    ctx.conf = (list(dilation), groups, chunk_rows)


def _compact_backward(ctx, grad_out):
    features, grid, sites, weight = ctx.saved_tensors
    dilation, groups, chunk_rows = ctx.conf
    grad_out = grad_out.contiguous()
    grad_f = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_f = torch.ops.tcm.submconv_compact_forward(grad_out, grid, sites, transposed_kernel(weight, groups), None,
                                                        dilation, groups, chunk_rows)
    if ctx.needs_input_grad[3]:
        grad_w = torch.ops.tcm.submconv_compact_weight_grad(grad_out, features, grid, sites, weight, dilation, groups,
                                                            chunk_rows)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = grad_out.float().sum(0).to(grad_out.dtype)
    return grad_f, None, None, grad_w, grad_b, None, None, None


torch.library.register_autograd("tcm::submconv_compact_forward", _compact_backward,
                                setup_context=_compact_setup_context)


@autocast_rule("lowp")
def submanifold_conv_compact(features: torch.Tensor, kernel_map: KernelMap, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, *, dilation: int | tuple[int, ...] = 1, groups: int = 1,
                             backend: str | None = None, chunk_rows: int = 0) -> torch.Tensor:
    """Submanifold sparse convolution on the compact layout (no gather/scatter: rows in, rows out).

    Args:
        features: float [N, Cin] (fp32/fp16/bf16; fp64 on the reference), one row per active
            site, rows in any order (e.g. ``SparseTensor.features``).
        kernel_map: :class:`~tcm_kernels.KernelMap` (grid int32 [B, *S], sites int64 [N]) of the
            rows, from ``SparseTensor.kernel_map()`` (built once, shared by every conv over the
            same sites). Contract: ``grid.flatten()[sites] == arange(N)`` and -1 at inactive sites.
        weight: [Cout, Cin/groups, *k], odd k, dtype of features; bias: optional [Cout].
        dilation, groups, backend, chunk_rows: as in :func:`submanifold_conv`.

    Returns:
        [N, Cout] in features' dtype, row i at the site of input row i: the rows of
        ``submanifold_conv`` of the densified input at the same sites.
    """
    nd = _check_compact_inputs(features, kernel_map, weight, bias, groups)
    dil = _check_dilation(dilation, nd, _COMPACT_OP)
    grid, sites = kernel_map
    chosen = _choose(features, backend, "submconv_compact_forward", _COMPACT_OP)
    if chosen == "reference":
        return _compact_reference(features, grid, sites, weight, bias, tuple(dil), groups)
    if chosen == "triton":
        from ..triton.submconv import submconv_compact_triton

        return submconv_compact_triton(features, grid, sites, weight, bias, dil, groups)
    return torch.ops.tcm.submconv_compact_forward(features, grid, sites, weight, bias, dil, groups, chunk_rows)


def _compact_reference(features: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """Scatter the rows to masked-dense, run the dense reference conv, gather the rows back."""
    batch, *spatial = grid.shape
    dense = features.new_zeros((grid.numel(), features.shape[1])).index_copy(0, sites, features)
    x = dense.reshape(batch, *spatial, -1).movedim(-1, 1)
    y = _ref.submanifold_conv(x, (grid >= 0).unsqueeze(1), weight, bias, dilation=dilation, groups=groups)
    return y.movedim(1, -1).reshape(grid.numel(), -1).index_select(0, sites)


@autocast_rule("lowp")
def sparse_downsample_compact(x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                              stride: int) -> SparseTensor:
    """:func:`sparse_downsample` on the compact layout: SparseTensor [N, Cin] -> SparseTensor [N_out, Cout].

    Output sites are the coarse sites (coords // stride) with at least one active child, in ascending
    (batch, *spatial) order; their kernel map comes attached. Each input row is copied to its slot
    (child window position) of a zero [N_out, s^d * Cin] matrix (missing children stay zero), then one
    GEMM with ``weight`` [Cout, Cin, s, ..., s] (+ bias). Plain torch ops (any device); backward is
    index_select + mm: deterministic.
    """
    op = "sparse_downsample"
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: x must be a SparseTensor, got {type(x).__name__}")
    features, nd = x.features, x.ndim
    check_tensor(op, "features", features, ndim=2, dtypes=_DTYPES)
    _check_weight_bias(op, weight, bias, 1, features.shape[1], features.dtype, nd)
    check_same_device(op, features=features, weight=weight, **({} if bias is None else {"bias": bias}))
    cin, cout = features.shape[1], weight.shape[0]
    _check_stride(op, stride, weight, x.spatial_shape, nd)
    coarse_shape = tuple(s // stride for s in x.spatial_shape)
    coords = x.coords.long()
    window = stride**nd
    out_key = coords[:, 0]
    child = torch.zeros_like(out_key)
    for axis in range(nd):
        out_key = out_key * coarse_shape[axis] + coords[:, 1 + axis] // stride
        child = child * stride + coords[:, 1 + axis] % stride
    out_sites, inverse = torch.unique(out_key, sorted=True, return_inverse=True)
    n_out = out_sites.shape[0]
    cols = features.new_zeros((n_out * window, cin)).index_copy(0, inverse * window + child, features)
    w = weight.movedim(1, -1).reshape(cout, window * cin)  # columns in (child, cin) order, as cols
    cols = cols.reshape(n_out, window * cin)
    y = cols @ w.t() if bias is None else torch.addmm(bias, cols, w.t())
    out_coords = torch.empty((n_out, 1 + nd), dtype=torch.int32, device=features.device)
    rest = out_sites
    for axis in reversed(range(nd)):
        out_coords[:, 1 + axis] = rest % coarse_shape[axis]
        rest = rest // coarse_shape[axis]
    out_coords[:, 0] = rest
    grid = torch.full((x.batch_size, *coarse_shape), -1, dtype=torch.int32, device=features.device)
    grid.view(-1)[out_sites] = torch.arange(n_out, dtype=torch.int32, device=features.device)
    out = SparseTensor(y, out_coords, coarse_shape, x.batch_size)
    out._kernel_map = KernelMap(grid, out_sites)  # unique, in range by construction: skip from_coords' checks
    return out
