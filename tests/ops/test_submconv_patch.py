"""The experimental patch-block path (dense tiles with halos) vs the dense reference conv(x*mask)*mask.

"cpu" runs the torch/oneDNN tile path (:func:`tcm_kernels.experimental.submanifold_conv_patch` on
CPU tensors), "triton" the Triton tile kernel under TRITON_INTERPRET=1 (small shapes).
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels.experimental import is_patch_aligned, prefer_patch_path, submanifold_conv_patch
from tcm_kernels.ops import submconv_patch as patch_ops
from tcm_kernels.reference import submconv as ref
from tests.ops.test_submconv import TOL, make_case
from tests.utils import assert_close_verbose, backend_param

OP = "submconv_forward"
CPU, TRITON = backend_param(OP, "cpu"), backend_param(OP, "triton")


@pytest.fixture
def dev(backend, device):
    """Triton tensors go to the GPU when there is one (else the interpreter runs them on the CPU)."""
    return device if backend == "triton" else torch.device("cpu")


def case(dev, *args, **kwargs):
    """make_case of tests/ops/test_submconv.py, on ``dev``."""
    return tuple(None if t is None else t.to(dev) for t in make_case(*args, **kwargs))


def conv(x, m, w, b=None, *, backend, patch, **kw):
    return submanifold_conv_patch(x, m, w, b, patch_size=patch, backend=backend, **kw)


def check_forward_backward(dev, backend, nd, cin, cout, k, groups, dilation, patch, spatial, atol=2e-4):
    x, m, w, b = case(dev, nd, cin, cout, k, groups, spatial=spatial, mask=patch)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = conv(xs, m, ws, bs, backend=backend, patch=patch, groups=groups, dilation=dilation)
    y_ref = ref.submanifold_conv(xr, m, wr, br, groups=groups, dilation=dilation)
    assert_close_verbose(y, y_ref, atol=atol, rtol=atol, name="y")
    assert bool((y[~m.expand_as(y)] == 0).all()), "inactive sites must be exactly 0"
    grad = torch.randn_like(y_ref)  # nonzero at inactive sites too: they must not leak into grad_x
    y.backward(grad)
    y_ref.backward(grad)
    for name, a, e in [("grad_x", xs.grad, xr.grad), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=2.5 * atol, rtol=2.5 * atol, name=name)


GROUPS = pytest.mark.parametrize("cin,cout,groups", [(5, 7, 1), (6, 4, 2), (6, 6, 6)],
                                 ids=["dense", "grouped", "depthwise"])


@pytest.mark.parametrize("backend", [CPU])
@pytest.mark.parametrize("nd,k,patch,spatial", [(2, 1, 4, (8, 12)), (2, 3, 4, (8, 12)), (2, 5, 2, (8, 10)),
                                                (2, 7, 4, (12, 16)), (3, 1, 2, (4, 6, 4)), (3, 3, 2, (4, 6, 4)),
                                                (3, 5, 2, (6, 4, 6)), (3, 7, 3, (6, 6, 9))])
@GROUPS
def test_cpu_forward_backward_vs_reference(backend, dev, nd, k, patch, spatial, cin, cout, groups):
    check_forward_backward(dev, backend, nd, cin, cout, k, groups, 1, patch, spatial)


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("nd,k,dilation,patch,spatial", [(2, 3, 2, 4, (8, 12)), (2, 5, 3, 2, (8, 6)),
                                                         (3, 3, 2, 2, (4, 4, 6))])
def test_dilation(backend, dev, nd, k, dilation, patch, spatial):
    check_forward_backward(dev, backend, nd, 4, 6, k, 1, dilation, patch, spatial)


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("nd,k,patch,spatial", [(2, 5, 1, (6, 7)), (2, 7, 2, (8, 10)), (3, 5, 1, (3, 4, 5))])
def test_halo_wider_than_a_patch(backend, dev, nd, k, patch, spatial):
    """p < r: the halo spans several patches (read from the padded dense input / the mask, so still right)."""
    assert patch < (k - 1) // 2
    check_forward_backward(dev, backend, nd, 4, 5, k, 1, 1, patch, spatial)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("nd,k,patch,spatial,cin,cout,groups", [  # interpreted: one program per group, keep it small
    (2, 1, 2, (6, 4), 5, 7, 1), (2, 3, 4, (8, 8), 5, 7, 1), (2, 3, 4, (8, 8), 6, 4, 2), (2, 3, 2, (4, 6), 6, 6, 6),
    (2, 7, 3, (6, 9), 5, 7, 1), (3, 3, 2, (4, 4, 6), 5, 7, 1), (3, 3, 2, (4, 2, 4), 6, 4, 2)])
def test_triton_forward_backward_vs_reference(backend, dev, nd, k, patch, spatial, cin, cout, groups):
    check_forward_backward(dev, backend, nd, cin, cout, k, groups, 1, patch, spatial, atol=5e-5)


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("dtype", list(TOL))
def test_dtypes_vs_reference(backend, dev, dtype):
    x, m, w, b = case(dev, 2, 8, 12, 3, dtype=dtype, spatial=(8, 12), mask=4)
    y = conv(x, m, w, b, backend=backend, patch=4)
    assert y.dtype == dtype
    atol, rtol = TOL[dtype]
    y_ref = ref.submanifold_conv(x.float(), m, w.float(), b.float())
    assert_close_verbose(y, y_ref, atol=atol, rtol=rtol, name=str(dtype))


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_rule(backend, dev, dtype):
    """Our fp16/bf16 error vs an fp64 oracle is at most 2x the same-dtype dense conv's (forward and grads)."""
    x, m, w, b = case(dev, 2, 16, 16, 3, spatial=(8, 8), mask=2)
    grad = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(1)).to(dev)

    def run(fn, dt):
        xi, wi, bi = (t.to(dt).requires_grad_() for t in (x, w, b))
        y = fn(xi, m, wi, bi)
        y.backward(grad.to(dt))
        return [t.double() for t in (y, xi.grad, wi.grad, bi.grad)]

    oracle = run(ref.submanifold_conv, torch.float64)
    ours = run(lambda *a: conv(*a, backend=backend, patch=2), dtype)
    dense = run(ref.submanifold_conv, dtype)
    for name, o, d, e in zip(("y", "grad_x", "grad_w", "grad_b"), ours, dense, oracle):
        err, dense_err = (o - e).abs().max().item(), (d - e).abs().max().item()
        assert err <= 2 * dense_err + 1e-6, f"{name}: ours {err:.3e} > 2 x dense {dense_err:.3e}"


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("nd", [2, 3])
def test_empty_and_all_visible_masks(backend, dev, nd):
    spatial = (8, 12) if nd == 2 else (4, 4, 6)
    x, _, w, b = case(dev, nd, 4, 6, 3, spatial=spatial)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    empty = torch.zeros((2, 1, *spatial), dtype=torch.bool, device=dev)
    y = conv(xs, empty, ws, bs, backend=backend, patch=2)
    assert bool((y == 0).all())
    y.sum().backward()
    assert all(bool((t.grad == 0).all()) for t in (xs, ws, bs))
    full = torch.ones_like(empty)
    dense = (torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d)(x, w, b, padding=1)
    assert_close_verbose(conv(x, full, w, b, backend=backend, patch=2), dense, atol=2e-4, rtol=2e-4,
                         name="all-visible")


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_noncontiguous_and_channels_last(backend, dev):
    x, m, w, b = case(dev, 2, 6, 5, 3, spatial=(8, 12), mask=4)
    expected = ref.submanifold_conv(x, m, w, b)
    strided = torch.cat([x, x], dim=3)[..., ::2]
    strided.copy_(x)
    for name, xi in [("channels_last", x.to(memory_format=torch.channels_last)), ("strided", strided)]:
        assert_close_verbose(conv(xi, m, w, b, backend=backend, patch=4), expected, atol=2e-4, rtol=2e-4, name=name)


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_deterministic(backend, dev):
    """Two runs give bit-identical outputs and gradients (no atomics; fixed reduction order)."""
    x, m, w, b = case(dev, 2, 8, 8, 3, spatial=(8, 8), mask=2)
    runs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = conv(xs, m, ws, bs, backend=backend, patch=2)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dev))
        runs.append([y, xs.grad, ws.grad, bs.grad])
    for name, a, e in zip(("y", "grad_x", "grad_w", "grad_b"), *runs):
        assert torch.equal(a, e), f"{name} differs between two runs"


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_bad_patch_size(backend, dev):
    """p not dividing S or an unaligned mask: ValueError (no silent fallback), also from the ops themselves."""
    x, m, w, b = case(dev, 2, 4, 6, 3, spatial=(8, 16), mask=4)
    assert not is_patch_aligned(m, 8)
    with pytest.raises(ValueError, match="mask must be aligned to patches of size 5"):
        conv(x, m, w, b, backend=backend, patch=5)
    with pytest.raises(ValueError, match="mask must be aligned to patches of size 8"):
        conv(x, m, w, b, backend=backend, patch=8)
    with pytest.raises(ValueError, match="patch_size 5 must divide the spatial shape \\(8, 16\\)"):
        torch.ops.tcm.submconv_patch(x, m, w, b, [1, 1], 1, 5)
    with pytest.raises(ValueError, match="mask must be aligned to patches of size 8"):
        torch.ops.tcm.submconv_patch(x, m, w, b, [1, 1], 1, 8)


def test_path_argument_is_validated():
    x, m, w, b = make_case(2, 4, 6, 3, spatial=(8, 12), mask=4)
    with pytest.raises(ValueError, match="path must be one of \\('auto', 'generic', 'patch'\\), got 'tiles'"):
        tcm_kernels.submanifold_conv(x, m, w, path="tiles")
    with pytest.raises(ValueError, match="path='patch' needs patch_size"):
        tcm_kernels.submanifold_conv(x, m, w, path="patch")


# The documented rule (docs/submconv.md, "Two compute paths"): cases on both sides of the measured crossover.
RULE_CASES = [
    ("cpu", 3, 16, (3, 3, 3), [1, 1, 1], 1, True),   # 96^3 volume, patch 16: patch-block path
    ("cpu", 3, 32, (5, 5, 5), [1, 1, 1], 1, True),
    ("cpu", 3, 16, (3, 3, 3), [2, 2, 2], 1, True),   # halo 2 = p / 8
    ("cpu", 3, 16, (5, 5, 5), [2, 2, 2], 1, False),  # halo 4 > p / 8
    ("cpu", 3, 16, (3, 3, 3), [1, 1, 1], 2, False),  # grouped: not measured, generic
    ("cpu", 3, 8, (3, 3, 3), [1, 1, 1], 1, False),
    ("cpu", 2, 8, (3, 3), [1, 1], 1, False),         # ResNet stage 1 (p = 8): generic
    ("cpu", 2, 32, (3, 3), [1, 1], 1, False),
    ("triton", 2, 1, (3, 3), [1, 1], 1, True),
    ("triton", 3, 4, (7, 7, 7), [1, 1, 1], 6, True),
    ("cuda", 3, 16, (3, 3, 3), [1, 1, 1], 1, False),
]


@pytest.mark.parametrize("backend,nd,patch,kernel,dilation,groups,expected", RULE_CASES)
def test_auto_rule(backend, nd, patch, kernel, dilation, groups, expected):
    assert prefer_patch_path(backend, nd, patch, kernel, dilation, groups) is expected


@pytest.mark.parametrize("backend", [CPU])
def test_default_dispatch_never_takes_the_patch_path(backend, monkeypatch):
    """The patch path left the default dispatch (no shipped config uses it); the deprecated path='patch'
    still reaches it, with a DeprecationWarning naming its new home."""
    calls = []
    real = patch_ops._patch_forward
    monkeypatch.setattr(patch_ops, "_patch_forward", lambda *a: calls.append(a[-1]) or real(*a))
    x2, m2, w2, _ = make_case(2, 4, 4, 3, spatial=(16, 16), mask=8)
    x3, m3, w3, _ = make_case(3, 2, 2, 3, spatial=(32, 16, 16), mask=16, bias=False)
    for x, m, w, patch, path, expected in [(x3, m3, w3, 16, "auto", []), (x3, m3, w3, None, "auto", []),
                                           (x3, m3, w3, 16, "generic", []), (x2, m2, w2, 8, "auto", []),
                                           (x2, m2, w2, 8, "patch", [8])]:
        calls.clear()
        if patch is None:
            y = tcm_kernels.submanifold_conv(x, m, w, path=path, backend=backend)
        else:
            with pytest.warns(DeprecationWarning, match="tcm_kernels.experimental.submanifold_conv_patch"):
                y = tcm_kernels.submanifold_conv(x, m, w, patch_size=patch, path=path, backend=backend)
        assert calls == expected, (x.dim(), patch, path)
        assert_close_verbose(y, ref.submanifold_conv(x, m, w), atol=2e-4, rtol=2e-4, name=path)


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_torch_compile_fullgraph(backend, dev):
    x, m, w1, b1 = case(dev, 2, 4, 8, 3, spatial=(8, 8), mask=2, seed=1)
    w2 = torch.randn(8, 8, 3, 3, device=dev) / 8

    def block(xi, mi, wa, ba, wb):
        h = torch.relu(conv(xi, mi, wa, ba, backend=backend, patch=2))
        return conv(h, mi, wb, backend=backend, patch=2, dilation=2)

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


@pytest.mark.parametrize("nd,k,groups,dilation,patch,spatial", [(2, 3, 1, 1, 4, (8, 12)), (2, 5, 2, 2, 2, (6, 8)),
                                                                (3, 3, 1, 1, 2, (4, 4, 6)), (3, 3, 4, 1, 2, (4, 2, 4))])
def test_tile_weight_grad_vs_reference(nd, k, groups, dilation, patch, spatial):
    """The oneDNN weight gradient over the tiles (used where the compiled engine's is not) vs the reference's."""
    x, m, w, _ = make_case(nd, 4, 8, k, groups, spatial=spatial, mask=patch, bias=False)
    wr = w.clone().requires_grad_()
    y = ref.submanifold_conv(x, m, wr, groups=groups, dilation=dilation)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = patch_ops._patch_weight_grad(grad, x, m, w, [dilation] * nd, groups, patch)
    assert_close_verbose(got, wr.grad, atol=5e-4, rtol=5e-4, name="grad_w")
    two = patch_ops._patch_weight_grad(grad, x, m, w, [dilation] * nd, groups, patch)
    assert torch.equal(got, two), "the tile weight gradient differs between two runs"


def test_opcheck_cpu_ops():
    x, m, w, b = make_case(2, 4, 6, 3, spatial=(8, 12), mask=4)
    torch.library.opcheck(torch.ops.tcm.submconv_patch.default,
                          (x.requires_grad_(), m, w.requires_grad_(), b.requires_grad_(), [1, 1], 1, 4))
    g = torch.randn(2, 6, 8, 12)
    torch.library.opcheck(torch.ops.tcm.submconv_patch_weight_grad.default, (g, x.detach(), m, w.detach(), [2, 1], 1, 4))


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_opcheck(backend, dev):
    x, m, w, b = case(dev, 2, 4, 4, 3, spatial=(4, 6), mask=2)
    torch.library.opcheck(torch.ops.tcm.submconv_patch_triton.default, (x.requires_grad_(), m, w.requires_grad_(), b, [1, 1], 1, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.fixture(scope="module")
def ptx_report():
    """The kernel for sm_80 and sm_90 in every dtype, at the largest tiles the launcher picks (tests/triton_compile.py)."""
    pytest.importorskip("triton", reason="triton not installed")
    from tests.triton_compile import compile_kernels

    ints = ['n_rows', 'depth', 'height', 'width', 'sxb', 'sxc', 'sxz', 'sxy', 'sxx', 'cin', 'cout', 'cin_g', 'cout_g', 'taps', 'pz', 'py', 'px']
    from tcm_kernels.triton.submconv import launch_tiles

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    jobs = []
    for cap in (80, 90):
        for dt in ("fp32", "fp16", "bf16"):
            block_m, block_n, block_k, warps = launch_tiles(1024, 1024, torch_dtype[dt])  # the largest tiles
            signature = {**{"x_ptr": f"*{dt}", "mask_ptr": "*i8", "w_ptr": f"*{dt}", "bias_ptr": "*fp32", "y_ptr": "*fp32", "tiles_ptr": "*i32", "offsets_ptr": "*i32"}, **{n: "i32" for n in ints}}
            jobs.append({"name": f"sm{cap}-{dt}", "kernel": "tcm_kernels.triton.submconv_patch:_submconv_patch_kernel",
                         "signature": signature, "cap": cap, "options": {"num_warps": warps},
                         "constexprs": {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                        "BLOCK_K": block_k, "EMULATE_BF16": False}})
    return compile_kernels(jobs, want_ptx=True)


@pytest.mark.parametrize("cap", [80, 90])
def test_triton_tile_kernel_compiles_to_ptx(ptx_report, cap):
    """Compiles; fp16/bf16 dots run on tensor cores (mma / wgmma in the PTX), fp32 dots do not (IEEE, no
    TF32); no spills and shared memory within the target's limit."""
    from tests.triton_compile import assert_conv_kernel

    for dt in ("fp32", "fp16", "bf16"):
        assert_conv_kernel(ptx_report[f"sm{cap}-{dt}"], cap, tensor_cores=dt != "fp32")