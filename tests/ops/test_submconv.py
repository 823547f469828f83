"""submanifold_conv / sparse_downsample: compiled CPU engine vs the dense reference conv(x*mask)*mask."""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels.ops.submconv import is_patch_aligned, transposed_kernel
from tcm_kernels.reference import submconv as ref
from tests.utils import assert_close_verbose, backend_param, run_without_interpreter

OP = "submconv_forward"
BACKENDS = [backend_param(OP, "cpu")]
# fp32: the engine sums in a different order than oneDNN's dense conv. fp16/bf16 are judged by the
# flash-attention rule against an fp64 oracle (test_half_precision_error_rule), these only catch gross errors.
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def random_mask(shape, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((shape[0], 1, *shape[2:]), generator=g) < density


def patch_mask(batch, spatial, patch, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((batch, 1, *(s // patch for s in spatial)), generator=g) < density
    for dim in range(2, coarse.dim()):
        coarse = coarse.repeat_interleave(patch, dim=dim)
    return coarse


def make_case(nd, cin, cout, k, groups=1, dtype=torch.float32, spatial=None, mask="random", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = spatial or ((11, 13) if nd == 2 else (5, 6, 7))
    x = torch.randn((2, cin, *spatial), generator=g).to(dtype)
    m = random_mask(x.shape, seed=seed) if mask == "random" else patch_mask(2, spatial, mask, seed=seed)
    w = (torch.randn((cout, cin // groups, *(k,) * nd), generator=g) / (cin // groups * k**nd) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    return x, m, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nd,k,spatial", [(2, 1, None), (2, 3, None), (2, 5, None), (2, 7, (13, 17)),
                                          (3, 1, None), (3, 3, None), (3, 5, None), (3, 7, (7, 8, 9))])
@pytest.mark.parametrize("cin,cout,groups", [(5, 7, 1), (6, 4, 2), (6, 6, 6), (4, 8, 4)],
                         ids=["dense", "grouped", "depthwise", "depthwise_x2"])
def test_forward_backward_vs_reference(backend, nd, k, spatial, cin, cout, groups):
    x, m, w, b = make_case(nd, cin, cout, k, groups, spatial=spatial)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = tcm_kernels.submanifold_conv(xs, m, ws, bs, groups=groups, backend=backend)
    y_ref = ref.submanifold_conv(xr, m, wr, br, groups=groups)
    assert_close_verbose(y, y_ref, atol=2e-4, rtol=2e-4, name="y")
    assert bool((y[~m.expand_as(y)] == 0).all()), "inactive sites must be exactly 0"
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    for name, a, e in [("grad_x", xs.grad, xr.grad), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-4, rtol=5e-4, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nd,patch", [(2, 4), (3, 2)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_patch_aligned_mask_and_dilation(backend, nd, patch, dilation):
    spatial = (16, 12) if nd == 2 else (8, 6, 4)
    x, m, w, b = make_case(nd, 8, 16, 3, spatial=spatial, mask=patch)
    assert is_patch_aligned(m, patch) and not is_patch_aligned(random_mask(x.shape), patch)
    y = tcm_kernels.submanifold_conv(x, m, w, b, dilation=dilation, patch_size=patch, backend=backend)
    assert_close_verbose(y, ref.submanifold_conv(x, m, w, b, dilation=dilation), atol=2e-4, rtol=2e-4, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_chunking_does_not_change_results(backend, chunk_rows):
    """Several chunks and several weight-gradient partitions (chunk_rows=1 -> 8 partitions)."""
    x, m, w, b = make_case(2, 8, 8, 3, spatial=(9, 10))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = tcm_kernels.submanifold_conv(xs, m, ws, b, backend=backend, chunk_rows=chunk_rows)
    y_ref = ref.submanifold_conv(xr, m, wr, b)
    assert_close_verbose(y, y_ref, atol=2e-4, rtol=2e-4, name="y")
    y.sum().backward()
    y_ref.sum().backward()
    assert_close_verbose(ws.grad, wr.grad, atol=5e-4, rtol=5e-4, name="grad_w")
    assert_close_verbose(xs.grad, xr.grad, atol=5e-4, rtol=5e-4, name="grad_x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nd", [2, 3])
def test_half_precision_error_rule(backend, dtype, nd):
    """Our fp16/bf16 error vs an fp64 oracle is at most 2x the same-dtype dense conv's (forward and grads)."""
    x, m, w, b = make_case(nd, 16, 16, 3, spatial=(12, 12) if nd == 2 else (6, 6, 6))
    grad = torch.randn((2, 16, *x.shape[2:]), generator=torch.Generator().manual_seed(1))

    def run(fn, dt):
        xi, wi, bi = (t.to(dt).requires_grad_() for t in (x, w, b))
        y = fn(xi, m, wi, bi)
        y.backward(grad.to(dt))
        return [t.double() for t in (y, xi.grad, wi.grad, bi.grad)]

    oracle = run(ref.submanifold_conv, torch.float64)
    ours = run(lambda *a: tcm_kernels.submanifold_conv(*a, backend=backend), dtype)
    dense = run(ref.submanifold_conv, dtype)
    for name, o, d, e in zip(("y", "grad_x", "grad_w", "grad_b"), ours, dense, oracle):
        err, dense_err = (o - e).abs().max().item(), (d - e).abs().max().item()
        assert err <= 2 * dense_err + 1e-6, f"{name}: ours {err:.3e} > 2 x dense {dense_err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
def test_dtypes_vs_reference(backend, dtype):
    x, m, w, b = make_case(2, 8, 12, 3, dtype=dtype)
    y = tcm_kernels.submanifold_conv(x, m, w, b, backend=backend)
    assert y.dtype == dtype
    atol, rtol = TOL[dtype]
    y_ref = ref.submanifold_conv(*(t.float() for t in (x,)), m, w.float(), b.float())
    assert_close_verbose(y, y_ref, atol=atol, rtol=rtol, name=str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_full_masks(backend):
    x, _, w, b = make_case(2, 4, 6, 3)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    empty = torch.zeros((2, 1, *x.shape[2:]), dtype=torch.bool)
    y = tcm_kernels.submanifold_conv(xs, empty, ws, bs, backend=backend)
    assert bool((y == 0).all())
    y.sum().backward()
    assert all(bool((t.grad == 0).all()) for t in (xs, ws, bs))
    full = torch.ones_like(empty)
    y = tcm_kernels.submanifold_conv(x, full, w, b, backend=backend)
    assert_close_verbose(y, torch.nn.functional.conv2d(x, w, b, padding=1), atol=2e-4, rtol=2e-4, name="all-active")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_channels_last(backend):
    x, m, w, b = make_case(2, 6, 5, 3, spatial=(10, 12))
    expected = ref.submanifold_conv(x, m, w, b)
    cl = x.to(memory_format=torch.channels_last)
    strided = torch.cat([x, x], dim=3)[..., ::2]  # a non-contiguous view equal to x
    strided.copy_(x)
    mask_view = torch.cat([m, m], dim=0)[:2]
    for name, xi, mi in [("channels_last", cl, m), ("strided", strided, m), ("mask_view", x, mask_view)]:
        assert_close_verbose(tcm_kernels.submanifold_conv(xi, mi, w, b, backend=backend), expected,
                             atol=2e-4, rtol=2e-4, name=name)
    x3 = torch.randn(1, 4, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    m3, w3 = random_mask(x3.shape), torch.randn(3, 4, 3, 3, 3)
    assert_close_verbose(tcm_kernels.submanifold_conv(x3, m3, w3, backend=backend), ref.submanifold_conv(x3, m3, w3),
                         atol=2e-4, rtol=2e-4, name="channels_last_3d")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_is_deterministic_across_thread_counts(backend):
    x, m, w, b = make_case(2, 16, 16, 3, spatial=(24, 24))
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            ws = w.clone().requires_grad_()
            tcm_kernels.submanifold_conv(x, m, ws, b, backend=backend, chunk_rows=16).sum().backward()
            grads.append(ws.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_gradcheck_reference_fp64():
    x, m, w, b = make_case(2, 3, 2, 3, spatial=(5, 4), dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda xi, wi, bi: ref.submanifold_conv(xi, m, wi, bi), args)
    x3, m3, w3, b3 = make_case(3, 2, 2, 3, groups=2, spatial=(3, 4, 3), dtype=torch.float64)
    args = [t.requires_grad_() for t in (x3, w3, b3)]
    assert torch.autograd.gradcheck(lambda xi, wi, bi: ref.submanifold_conv(xi, m3, wi, bi, groups=2), args)


def test_transposed_kernel_gives_input_gradient():
    """The identity the compiled backward relies on: grad_x = submconv(grad_out, flip(W)^T)."""
    x, m, w, _ = make_case(2, 6, 4, 3, groups=2, dtype=torch.float64, bias=False)
    xr = x.clone().requires_grad_()
    g = torch.randn((2, 4, *x.shape[2:]), dtype=torch.float64)
    ref.submanifold_conv(xr, m, w, groups=2).backward(g)
    via_transpose = ref.submanifold_conv(g, m, transposed_kernel(w, 2), groups=2)
    torch.testing.assert_close(via_transpose, xr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, m, w, b = make_case(2, 4, 6, 3)
    torch.library.opcheck(torch.ops.tcm.submconv_forward.default, (x.requires_grad_(), m, w.requires_grad_(),
                                                                   b.requires_grad_(), [1, 1], 1, 0))
    g = torch.randn(2, 6, *x.shape[2:])
    torch.library.opcheck(torch.ops.tcm.submconv_weight_grad.default, (g, x.detach(), m, w.detach(), [2, 1], 1, 0))
    x3, m3, w3, b3 = make_case(3, 4, 4, 3, groups=4)
    torch.library.opcheck(torch.ops.tcm.submconv_forward.default, (x3.requires_grad_(), m3, w3.requires_grad_(), b3,
                                                                   [1, 1, 1], 4, 0))
    torch.library.opcheck(torch.ops.tcm.submconv_kernel_map.default, (m,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_kernel_map_grid():
    m = random_mask((2, 1, 5, 7))
    grid, sites = torch.ops.tcm.submconv_kernel_map(m)
    assert torch.equal(grid >= 0, m[:, 0])
    assert torch.equal(grid[m[:, 0]], torch.arange(int(m.sum()), dtype=torch.int32))
    assert torch.equal(sites, m.flatten().nonzero().flatten())


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_two_layer_block(backend):
    x, m, w1, b1 = make_case(2, 4, 8, 3, seed=1)
    w2 = torch.randn(8, 8, 3, 3) / 8

    def block(xi, mi, wa, ba, wb):
        h = torch.relu(tcm_kernels.submanifold_conv(xi, mi, wa, ba, backend=backend))
        return tcm_kernels.submanifold_conv(h, mi, wb, dilation=2, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    args_c = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    y = block(args[0], m, *args[1:])
    y_c = compiled(args_c[0], m, *args_c[1:])
    assert_close_verbose(y_c, y, atol=1e-5, rtol=1e-5, name="compiled")
    y.sum().backward()
    y_c.sum().backward()
    for a, e in zip(args_c, args):
        assert_close_verbose(a.grad, e.grad, atol=1e-5, rtol=1e-5, name="compiled grad")


@pytest.mark.parametrize("nd", [2, 3])
def test_sparse_downsample(nd):
    spatial = (8, 12) if nd == 2 else (4, 6, 8)
    x, m, _, b = make_case(nd, 4, 6, 1, spatial=spatial)
    w = torch.randn(6, 4, *(2,) * nd)
    y, mask_out = tcm_kernels.sparse_downsample(x, m, w, b, stride=2)
    pooled = m.reshape(2, 1, *[v for s in spatial for v in (s // 2, 2)])
    expected_mask = pooled.amax(dim=tuple(range(3, 3 + 2 * nd, 2)))
    assert torch.equal(mask_out, expected_mask)
    dense = (torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d)(x * m, w, b, stride=2)
    assert_close_verbose(y, dense * mask_out, atol=1e-5, rtol=1e-5, name="downsample")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    x, m, w, b = make_case(2, 4, 6, 3)
    conv = tcm_kernels.submanifold_conv
    with pytest.raises(ValueError, match="kernel size must be odd"):
        conv(x, m, torch.randn(6, 4, 2, 2), backend=backend)
    with pytest.raises(ValueError, match="weight must be \\[Cout, Cin/groups"):
        conv(x, m, torch.randn(6, 3, 3, 3), backend=backend)
    with pytest.raises(ValueError, match="weight must be \\[Cout, Cin/groups"):
        conv(x, m, torch.randn(6, 4, 3, 3), groups=2, backend=backend)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        conv(x, m, w, groups=0, backend=backend)
    with pytest.raises(ValueError, match="mask must be \\[B, 1, \\*S\\]"):
        conv(x, m[:, :, :-1], w, backend=backend)
    with pytest.raises(TypeError, match="mask must have dtype in \\(bool\\)"):
        conv(x, m.float(), w, backend=backend)
    with pytest.raises(TypeError, match="weight must have dtype in \\(float32\\)"):
        conv(x, m, w.double(), backend=backend)
    with pytest.raises(ValueError, match="tensors must be on one device"):
        conv(x, m.to("meta"), w, backend=backend)
    with pytest.raises(ValueError, match="bias must be \\[Cout=6\\]"):
        conv(x, m, w, b[:3], backend=backend)
    with pytest.raises(ValueError, match="dilation must be a positive int or 2"):
        conv(x, m, w, dilation=(1, 0), backend=backend)
    with pytest.raises(ValueError, match="x must be 4-D or 5-D"):
        conv(x[0], m[0], w, backend=backend)
    with pytest.raises(ValueError, match="mask must be aligned to patches of size 4"):
        conv(x[..., :8, :8], random_mask((2, 1, 8, 8)), w, patch_size=4, backend=backend)
    with pytest.raises(ValueError, match="stride 2 must divide"):
        tcm_kernels.sparse_downsample(x, m, torch.randn(6, 4, 2, 2), stride=2)
    with pytest.raises(ValueError, match="weight kernel must equal the stride"):
        tcm_kernels.sparse_downsample(x[..., :10, :12], m[..., :10, :12], w, stride=2)
    with pytest.raises(ValueError, match="kernel size must be odd"):  # the compiled op checks too
        torch.ops.tcm.submconv_forward(x, m, torch.randn(6, 4, 2, 2), None, [1, 1], 1, 0)


# ---- Triton implicit GEMM (interpreted on CPU tensors without a GPU; small shapes) ---------------------

TRITON = backend_param(OP, "triton")


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("nd,cin,cout,groups,k,dilation", [(2, 5, 7, 1, 3, 1), (3, 4, 6, 2, 3, 1), (2, 6, 6, 6, 5, 2),
                                                           (2, 3, 20, 1, 1, 1), (3, 2, 2, 2, 3, 2)])
def test_triton_forward_backward_vs_reference(backend, device, nd, cin, cout, groups, k, dilation):
    x, m, w, b = (t.to(device) for t in make_case(nd, cin, cout, k, groups, spatial=(9, 7) if nd == 2 else (4, 5, 3)))
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = tcm_kernels.submanifold_conv(xs, m, ws, bs, groups=groups, dilation=dilation, backend=backend)
    y_ref = ref.submanifold_conv(xr, m, wr, br, groups=groups, dilation=dilation)
    assert_close_verbose(y, y_ref, atol=2e-5, rtol=2e-5, name="y")
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    for name, a, e in [("grad_x", xs.grad, xr.grad), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-5, rtol=5e-5, name=name)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_error_rule(backend, device, dtype):
    x, m, w, b = (t.to(device) for t in make_case(2, 8, 8, 3, spatial=(8, 8)))
    oracle = ref.submanifold_conv(x.double(), m, w.double(), b.double())
    ours = tcm_kernels.submanifold_conv(x.to(dtype), m, w.to(dtype), b.to(dtype), backend=backend)
    dense = ref.submanifold_conv(x.to(dtype), m, w.to(dtype), b.to(dtype))
    assert ours.dtype == dtype
    err, dense_err = (ours.double() - oracle).abs().max().item(), (dense.double() - oracle).abs().max().item()
    assert err <= 2 * dense_err + 1e-6, f"ours {err:.3e} > 2 x dense {dense_err:.3e}"


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_empty_mask_and_opcheck(backend, device):
    from tcm_kernels.triton.submconv import submconv_triton

    x, m, w, b = (t.to(device) for t in make_case(2, 4, 4, 3, spatial=(5, 6)))
    empty = torch.zeros_like(m)
    assert bool((tcm_kernels.submanifold_conv(x, empty, w, b, backend=backend) == 0).all())
    torch.library.opcheck(submconv_triton, (x.requires_grad_(), m, w.requires_grad_(), b, [1, 1], 1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


_PTX_CHECK = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from tcm_kernels.triton import submconv as tsc

ints = ["n_rows", "depth", "height", "width", "cin", "cout", "cin_g", "cout_g", "taps"]
signature = {"x_ptr": "*fp16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp32", "grid_ptr": "*i32",
             "sites_ptr": "*i64", "offsets_ptr": "*i32", **{n: "i32" for n in ints},
             "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
report = {}
for cap in (80, 90):
    src = triton.compiler.ASTSource(fn=tsc._submconv_rows_kernel, signature=signature,
                                    constexprs={"HAS_BIAS": True, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32})
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    report[f"sm{cap}"] = {"target": re.search(r"\.target\s+(\S+)", ptx).group(1),
                          "entry": "_submconv_rows_kernel" in ptx, "cubin_bytes": len(k.asm["cubin"])}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def ptx_report():
    """Compile in a fresh interpreter: under TRITON_INTERPRET=1 triton.jit does not build compilable kernels."""

    pytest.importorskip("triton", reason="triton not installed")
    return run_without_interpreter(_PTX_CHECK)


@pytest.mark.parametrize("cap", [80, 90])
def test_triton_kernel_compiles_to_ptx(ptx_report, cap):
    entry = ptx_report[f"sm{cap}"]
    assert entry["target"] == ("sm_80" if cap == 80 else "sm_90a") and entry["entry"] and entry["cubin_bytes"] > 0
