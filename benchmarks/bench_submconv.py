"""Submanifold sparse convolution on this CPU vs what users run today.

Baselines, side by side per layer shape and mask:
* ``dense_emulation`` (baseline): SparK / AnatoMask, ``conv(x * mask) * mask`` through oneDNN;
* ``spconv``: spconv 2.x ``SubMConv{2,3}d`` forward on the CPU (when installed), timed on its own
  SparseConvTensor (conversion excluded);
* ``tcm_cpu``: our generic path, the compiled engine (implicit GEMM over cache-sized chunks of active
  rows; the default dispatch);
* ``tcm_cpu_patch``: our experimental patch-block path (``tcm_kernels.experimental.submanifold_conv_patch``):
  dense tiles with halos cut from the masked-dense input by strided views, one oneDNN conv over all active tiles;
* ``tcm_cpu_compact``: the generic engine on the compact layout (features already [N, C] with a cached
  kernel map: no gather/scatter), what the SparseTensor encoders run; its weight layouts are cached across
  calls (tcm_kernels/ops/weight_layout.py), as in gradient accumulation or evaluation;
* ``tcm_cpu_compact_step`` (3-D forward+backward): the same with the weight updated in place before every
  call, as by an optimizer step, so the layouts are rebuilt every call: the cost of a training step;
* ``mm_same_gemm``: one at::mm of the same useful work ([N_active, k^d C] x [k^d C, C]), the
  reference rate for the GFLOP/s target (forward only);
* ``kernel_map``: the kernel-map build alone (forward only).

Every provider's output (and, for forward+backward, gradients) is compared with the
dense reference before it is timed; a wrong one keeps its time but is named
``<provider> (WRONG)`` and carries ``correct: False``. Useful FLOPs = 2 Cin Cout k^d / groups
per active output site (x3 for forward+backward), for every provider.

Shapes: ResNet-50's four stage widths of a 224^2 image (56^2 C64 ... 7^2 C512), batch 16,
3x3 kernels; masks of SparK (patch 32, 60 % masked) and TCM (40 % masked); 3D: the stages of a
residual encoder on a 96^3 crop with 16^3 patches, batch 2 (96^3 C32 and C64, 48^3 C64, 24^3 C128, 12^3 C320). ``--benchmark-disable`` (CI) shrinks every shape to batch 1 and 1/4 the side.

``sparse_downsample`` group (forward): ResNet-50's stage transitions at 224^2 (stride-2 kernel-2 conv,
C -> C: 256 at 56^2, 512 at 28^2, 1024 at 14^2; batch 16), providers ``dense_strided`` (baseline: the
strided conv of the masked input, SparK), ``tcm_cpu`` (space-to-depth + 1x1 submanifold conv at the
output mask) and ``tcm_compact`` (SparseTensor in and out).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tcm_kernels
from benchmarks.common import run
from tcm_kernels.reference import submconv as ref
from tcm_kernels.sparse_tensor import weight_to_spconv

HAS_SPCONV = importlib.util.find_spec("spconv") is not None

# (name, nd, side, channels, patch at this scale, batch)
LAYERS_2D = [("r50_s1_56", 2, 56, 64, 8, 16), ("r50_s2_28", 2, 28, 128, 4, 16), ("r50_s3_14", 2, 14, 256, 2, 16),
             ("r50_s4_7", 2, 7, 512, 1, 16)]
# 3-D: the stages of a residual encoder on a 96^3 crop with 16^3 patches (stride 1, 2, 4, 8: widths 32 ... 320).
LAYERS_3D = [("vol96_c32", 3, 96, 32, 16, 2), ("vol96_c64", 3, 96, 64, 16, 2), ("vol48_c64", 3, 48, 64, 8, 2),
             ("vol24_c128", 3, 24, 128, 4, 2), ("vol12_c320", 3, 12, 320, 2, 2)]
MASKS = {"spark_vis40": 0.4, "tcm_vis60": 0.6}


def patch_mask(batch: int, nd: int, side: int, patch: int, visible: float, seed: int = 0) -> torch.Tensor:
    """bool [B, 1, *S]: exactly round(visible * patches) visible patches per image, patch-aligned."""
    g = torch.Generator().manual_seed(seed)
    grid = side // patch
    n = grid**nd
    keep = round(visible * n)
    order = torch.rand(batch, n, generator=g).argsort(1)
    coarse = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, order[:, :keep], True)
    coarse = coarse.reshape(batch, 1, *(grid,) * nd)
    for dim in range(2, 2 + nd):
        coarse = coarse.repeat_interleave(patch, dim=dim)
    return coarse


def setup(layer, visible: float, shrink: bool):
    name, nd, side, c, patch, batch = layer
    if shrink:  # CI smoke run: same code paths, small tensors
        side, batch, patch = max(side // 4, 4), 1, max(patch // 4, 1)
        side -= side % patch
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, c, *(side,) * nd), generator=g)
    mask = patch_mask(batch, nd, side, patch, visible)
    w = torch.randn((c, c, *(3,) * nd), generator=g) / (9 * c) ** 0.5
    return x, mask, w, patch


def useful_flops(mask: torch.Tensor, w: torch.Tensor) -> float:
    return 2.0 * w[0].numel() * w.shape[0] * int(mask.sum())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, atol=1e-3 * max(b.abs().max().item(), 1.0), rtol=1e-3))


def _spconv_forward(x, mask, w):
    import spconv.pytorch as spconv

    st = tcm_kernels.SparseTensor.from_dense(x, mask).to_spconv()
    conv = (spconv.SubMConv2d if x.dim() == 4 else spconv.SubMConv3d)(x.shape[1], w.shape[0], 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight_to_spconv(w))

    def call():
        with torch.no_grad():
            return conv(st)

    return call, lambda out: out.dense()


def _grad_out(x, w):
    """Fixed upstream gradient [B, Cout, *S] on x's device, in x's dtype."""
    return torch.randn((x.shape[0], w.shape[0], *x.shape[2:]), generator=torch.Generator().manual_seed(1)).to(x)


def _compact_provider(x, mask, w, backward: bool, step: bool = False):
    """Features already compact, kernel map cached (built outside the timed call, once per set of sites).

    ``step``: the weight is updated in place before every call, as by an optimizer step, so the engine's
    weight layouts are rebuilt every call (without it, repeated calls reuse them: gradient accumulation).
    """
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    km = st.kernel_map()

    def dense(rows):
        return st.replace_features(rows).dense()[0]

    if not backward:
        return (lambda: tcm_kernels.submanifold_conv_compact(st.features, km, w, backend="cpu")), (lambda y: (dense(y),))
    fg, wg = st.features.clone().requires_grad_(), w.clone().requires_grad_()
    grad = _grad_out(x, w).movedim(1, -1)[mask[:, 0]]

    def call():
        fg.grad = wg.grad = None
        if step:
            with torch.no_grad():
                wg.mul_(1.0)  # a new version of the same values
        y = tcm_kernels.submanifold_conv_compact(fg, km, wg, backend="cpu")
        y.backward(grad)
        return y

    return call, lambda y: (dense(y.detach()), dense(fg.grad), wg.grad)


def _dense_call(conv, x, w, backward: bool):
    """(call, unpack) of a masked-dense ``conv(x, w)``; with ``backward``, one fixed upstream gradient."""
    if not backward:
        return (lambda: conv(x, w)), (lambda y: (y,))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    grad = _grad_out(x, w)

    def call():
        xg.grad = wg.grad = None
        y = conv(xg, wg)
        y.backward(grad)
        return y

    return call, lambda y: (y.detach(), xg.grad, wg.grad)


def _provider(provider: str, x, mask, w, patch: int, backward: bool):
    """(callable, function mapping its result to (y, grads...)) for one provider."""
    if provider in ("tcm_cpu_compact", "tcm_cpu_compact_step"):
        return _compact_provider(x, mask, w, backward, step=provider == "tcm_cpu_compact_step")
    if provider == "spconv":
        call, to_dense = _spconv_forward(x, mask, w)
        return call, lambda out: (to_dense(out),)
    conv = {"dense_emulation": lambda xi, wi: ref.submanifold_conv(xi, mask, wi),
            "tcm_cpu": lambda xi, wi: tcm_kernels.submanifold_conv(xi, mask, wi, backend="cpu"),
            "tcm_cpu_patch": lambda xi, wi: tcm_kernels.experimental.submanifold_conv_patch(
                xi, mask, wi, patch_size=patch, backend="cpu")}[provider]
    return _dense_call(conv, x, w, backward)


def _reference(x, mask, w, backward: bool):
    call, unpack = _provider("dense_emulation", x, mask, w, 1, backward)
    return [t.clone() for t in unpack(call())]


def _bench(benchmark, layer, mask_name, provider, backward):
    x, mask, w, patch = setup(layer, MASKS[mask_name], benchmark.disabled)
    flops = useful_flops(mask, w) * (3 if backward else 1)
    mode = "fwd_bwd" if backward else "fwd"
    group = f"submconv-{layer[0]}-{mask_name}-{mode}"
    info = dict(shape=list(x.shape), dtype="float32", visible=MASKS[mask_name], patch=patch, mode=mode)
    if provider in ("mm_same_gemm", "kernel_map"):
        n = int(mask.sum())
        if provider == "mm_same_gemm":
            a, b = torch.randn(n, w[0].numel()), torch.randn(w[0].numel(), w.shape[0])
            call = lambda: a @ b  # noqa: E731
        else:
            call = lambda: torch.ops.tcm.submconv_kernel_map(mask)  # noqa: E731
        run(benchmark, call, group=group, provider=provider, flops=flops if provider == "mm_same_gemm" else None,
            **info)
        return
    call, unpack = _provider(provider, x, mask, w, patch, backward)
    expected = _reference(x, mask, w, backward)
    got = unpack(call())
    correct = all(_close(a, e) for a, e in zip(got, expected))
    name = provider if correct else f"{provider} (WRONG)"
    run(benchmark, call, group=group, provider=name, baseline=provider == "dense_emulation", flops=flops,
        correct=correct, **info)


PROVIDERS_FWD = ["dense_emulation", "tcm_cpu", "tcm_cpu_compact", "tcm_cpu_patch", "mm_same_gemm", "kernel_map",
                 pytest.param("spconv", marks=pytest.mark.skipif(not HAS_SPCONV, reason="spconv not installed"))]


@pytest.mark.parametrize("provider", PROVIDERS_FWD)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", LAYERS_2D, ids=[l[0] for l in LAYERS_2D])
def test_submconv_2d_forward(benchmark, layer, mask_name, provider):
    _bench(benchmark, layer, mask_name, provider, backward=False)


@pytest.mark.parametrize("provider", ["dense_emulation", "tcm_cpu", "tcm_cpu_compact", "tcm_cpu_patch"])  # spconv's CPU: no backward
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", LAYERS_2D, ids=[l[0] for l in LAYERS_2D])
def test_submconv_2d_forward_backward(benchmark, layer, mask_name, provider):
    _bench(benchmark, layer, mask_name, provider, backward=True)


@pytest.mark.parametrize("provider", PROVIDERS_FWD)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", LAYERS_3D, ids=[l[0] for l in LAYERS_3D])
def test_submconv_3d_forward(benchmark, layer, mask_name, provider):
    _bench(benchmark, layer, mask_name, provider, backward=False)


@pytest.mark.parametrize("provider", ["dense_emulation", "tcm_cpu", "tcm_cpu_compact", "tcm_cpu_compact_step",
                                      "tcm_cpu_patch"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", LAYERS_3D, ids=[l[0] for l in LAYERS_3D])
def test_submconv_3d_forward_backward(benchmark, layer, mask_name, provider):
    _bench(benchmark, layer, mask_name, provider, backward=True)


# ---- sparse_downsample: ResNet-50 stage transitions ---------------------------------------------------------

# (name, channels, input side, patch at this scale, batch)
DOWNS_2D = [("r50_d1_56", 256, 56, 8, 16), ("r50_d2_28", 512, 28, 4, 16), ("r50_d3_14", 1024, 14, 2, 16)]


def _downsample_provider(provider: str, x, mask, w):
    if provider == "dense_strided":
        return lambda: ref.sparse_downsample(x, mask, w, stride=2), lambda out: out
    if provider == "tcm_cpu":
        return lambda: tcm_kernels.sparse_downsample(x, mask, w, stride=2), lambda out: out
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    return (lambda: tcm_kernels.sparse_downsample_compact(st, w, stride=2)), (lambda out: out.dense())


@pytest.mark.parametrize("provider", ["dense_strided", "tcm_cpu", "tcm_compact"])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", DOWNS_2D, ids=[l[0] for l in DOWNS_2D])
def test_sparse_downsample_2d_forward(benchmark, layer, mask_name, provider):
    name, c, side, patch, batch = layer
    if benchmark.disabled:  # CI smoke run: same code paths, small tensors
        c, patch, batch = c // 16, max(patch // 2, 1), 1
        side = max(side // 2 - (side // 2) % (2 * patch), 2 * patch)  # stride 2 and the patch divide it
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, c, side, side), generator=g)
    mask = patch_mask(batch, 2, side, patch, MASKS[mask_name])
    w = torch.randn((c, c, 2, 2), generator=g) / (4 * c) ** 0.5
    call, to_dense = _downsample_provider(provider, x, mask, w)
    y_ref, m_ref = ref.sparse_downsample(x, mask, w, stride=2)
    y, m = to_dense(call())
    correct = torch.equal(m, m_ref) and _close(y, y_ref)
    flops = 2.0 * c * c * 4 * int(m_ref.sum())  # useful work: active output windows only
    run(benchmark, call, group=f"sparse_downsample-{name}-{mask_name}-fwd",
        provider=provider if correct else f"{provider} (WRONG)", baseline=provider == "dense_strided", flops=flops,
        correct=correct, shape=list(x.shape), dtype="float32", visible=MASKS[mask_name], mode="fwd")


# ---- GPU: the same layers and masks against the GPU peers a user would pick (make gpu-check) ----------------
#
# Providers: ``dense_emulation`` (baseline: SparK's conv(x * mask) * mask through cuDNN, TF32 off), ``tcm_triton``
# (generic path), ``tcm_triton_patch`` (patch-block path), ``tcm_triton_compact`` (SparseTensor rows, cached kernel
# map), ``tcm_cuda`` (the CUDA kernels: kernel map, gathers, cuBLAS), ``spconv`` (spconv 2.x CUDA wheel,
# ``SubMConv{2,3}d``) and ``spconv_triton`` (spconv-Triton, the Triton drop-in with spconv's API), each skipped
# with the reason when it is not installed. fp32 and bf16; forward and forward+backward; every output (and the
# input gradient) is checked against the fp32 dense reference before timing (bf16 at 2 % of the output scale).

SPCONV_MODULES = {"spconv": "spconv.pytorch", "spconv_triton": "spconv_triton.pytorch"}
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _gpu_param(provider: str):
    module = SPCONV_MODULES.get(provider)
    marks = [pytest.mark.gpu]
    if module is not None:
        marks.append(pytest.mark.skipif(not _installed(module), reason=f"{module} not installed"))
    return pytest.param(provider, marks=marks)


GPU_PROVIDERS = [_gpu_param(p) for p in ("dense_emulation", "tcm_triton", "tcm_triton_patch", "tcm_triton_compact",
                                         "tcm_cuda", "spconv", "spconv_triton")]


def _gpu_spconv(module_name: str, x, mask, w, backward: bool):
    """spconv-style module on its own SparseConvTensor (built outside the timed call); (call, unpack)."""
    import importlib

    sp = importlib.import_module(module_name)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    feats = st.features.detach().clone().requires_grad_(backward)
    tensor = sp.SparseConvTensor(feats, st.coords.to(torch.int32).contiguous(), list(st.spatial_shape),
                                 st.batch_size)
    conv = (sp.SubMConv2d if x.dim() == 4 else sp.SubMConv3d)(x.shape[1], w.shape[0], 3, bias=False)
    conv = conv.to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight_to_spconv(w))
    grad = _grad_out(x, w).movedim(1, -1)[mask[:, 0]]

    def call():
        if not backward:
            with torch.no_grad():
                return conv(tensor).features
        feats.grad = None
        out = conv(tensor).features
        out.backward(grad)
        return out

    def unpack(out):
        # spconv keeps the rows of its input: the same order as st's features
        y = st.replace_features(out.detach()).dense()[0]
        return (y,) if not backward else (y, st.replace_features(feats.grad).dense()[0])

    return call, unpack


def _gpu_provider(provider: str, x, mask, w, patch: int, backward: bool):
    if provider in SPCONV_MODULES:
        return _gpu_spconv(SPCONV_MODULES[provider], x, mask, w, backward)
    if provider == "tcm_triton_compact":
        st = tcm_kernels.SparseTensor.from_dense(x, mask)
        km = st.kernel_map()
        feats, wg = st.features.detach().clone().requires_grad_(backward), w.clone().requires_grad_(backward)
        grad = _grad_out(x, w).movedim(1, -1)[mask[:, 0]]

        def call():
            if not backward:
                return tcm_kernels.submanifold_conv_compact(feats, km, w, backend="triton")
            feats.grad = wg.grad = None
            y = tcm_kernels.submanifold_conv_compact(feats, km, wg, backend="triton")
            y.backward(grad)
            return y

        def unpack(y):
            dense = st.replace_features(y.detach()).dense()[0]
            return (dense,) if not backward else (dense, st.replace_features(feats.grad).dense()[0], wg.grad)

        return call, unpack
    conv = {"dense_emulation": lambda xi, wi: ref.submanifold_conv(xi, mask, wi),
            "tcm_triton": lambda xi, wi: tcm_kernels.submanifold_conv(xi, mask, wi, backend="triton"),
            "tcm_triton_patch": lambda xi, wi: tcm_kernels.experimental.submanifold_conv_patch(
                xi, mask, wi, patch_size=patch, backend="triton"),
            "tcm_cuda": lambda xi, wi: tcm_kernels.submanifold_conv(xi, mask, wi, backend="cuda")}[provider]
    return _dense_call(conv, x, w, backward)


def _bench_gpu(benchmark, layer, mask_name, provider, dtype_name, backward):
    x, mask, w, patch = setup(layer, MASKS[mask_name], benchmark.disabled)
    x, mask, w = x.cuda(), mask.cuda(), w.cuda()
    expected = [t.float() for t in _reference(x, mask, w, backward)]  # fp32 dense reference on the GPU
    dtype = GPU_DTYPES[dtype_name]
    xd, wd = x.to(dtype), w.to(dtype)
    call, unpack = _gpu_provider(provider, xd, mask, wd, patch, backward)
    got = unpack(call())
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    correct = all(bool(torch.allclose(a.float(), e, atol=tol * max(e.abs().max().item(), 1.0), rtol=tol))
                  for a, e in zip(got, expected))
    mode = "fwd_bwd" if backward else "fwd"
    run(benchmark, call, group=f"submconv-gpu-{layer[0]}-{mask_name}-{dtype_name}-{mode}",
        provider=provider if correct else f"{provider} (WRONG)", baseline=provider == "dense_emulation",
        flops=useful_flops(mask, w) * (3 if backward else 1), device="cuda", correct=correct,
        shape=list(x.shape), dtype=dtype_name, visible=MASKS[mask_name], patch=patch, mode=mode)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layer", LAYERS_2D + LAYERS_3D, ids=[l[0] for l in LAYERS_2D + LAYERS_3D])
def test_submconv_gpu(benchmark, layer, mask_name, provider, dtype_name, backward):
    _bench_gpu(benchmark, layer, mask_name, provider, dtype_name, backward)
