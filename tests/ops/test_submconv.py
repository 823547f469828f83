"""submanifold_conv / sparse_downsample: compiled CPU engine vs the dense reference conv(x*mask)*mask."""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels._core.geometry import space_to_depth, transposed_kernel
from tcm_kernels.experimental import is_patch_aligned
from tcm_kernels.reference import submconv as ref
from tests.utils import assert_close_verbose, backend_param

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
    with pytest.warns(DeprecationWarning, match="tcm_kernels.experimental.submanifold_conv_patch"):
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
    with pytest.raises(ValueError, match="mask must be aligned to patches of size 4"), \
            pytest.warns(DeprecationWarning):
        conv(x[..., :8, :8], random_mask((2, 1, 8, 8)), w, patch_size=4, backend=backend)
    with pytest.raises(ValueError, match="stride 2 must divide"):
        tcm_kernels.sparse_downsample(x, m, torch.randn(6, 4, 2, 2), stride=2)
    with pytest.raises(ValueError, match="weight kernel must equal the stride"):
        tcm_kernels.sparse_downsample(x[..., :10, :12], m[..., :10, :12], w, stride=2)
    with pytest.raises(ValueError, match="kernel size must be odd"):  # the compiled op checks too
        torch.ops.tcm.submconv_forward(x, m, torch.randn(6, 4, 2, 2), None, [1, 1], 1, 0)


# ---- sparse downsample (space-to-depth + 1x1 submanifold conv) vs the dense strided conv -------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nd,spatial,stride", [(2, (8, 12), 2), (2, (9, 6), 3), (2, (7, 5), 1), (3, (4, 6, 8), 2),
                                               (3, (3, 6, 3), 3)])
def test_sparse_downsample_vs_dense_oracle(backend, nd, spatial, stride):
    x, m, _, b = make_case(nd, 5, 7, 1, spatial=spatial)
    w = torch.randn(7, 5, *(stride,) * nd) / (5 * stride**nd) ** 0.5
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y, mask_out = tcm_kernels.sparse_downsample(xs, m, ws, bs, stride=stride, backend=backend)
    y_ref, mask_ref = ref.sparse_downsample(xr, m, wr, br, stride=stride)
    pooled = m.reshape(2, 1, *[v for s in spatial for v in (s // stride, stride)])
    assert torch.equal(mask_ref, pooled.amax(dim=tuple(range(3, 3 + 2 * nd, 2)))), "oracle mask = max-pool"
    assert torch.equal(mask_out, mask_ref)
    assert_close_verbose(y, y_ref, atol=2e-5, rtol=2e-5, name="y")
    assert bool((y[~mask_out.expand_as(y)] == 0).all())
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    for name, a, e in [("grad_x", xs.grad * m, xr.grad * m), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-5, rtol=5e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_downsample_empty_mask_and_half(backend):
    x, m, _, b = make_case(2, 4, 6, 1, spatial=(6, 8))
    w = torch.randn(6, 4, 2, 2)
    y, mask_out = tcm_kernels.sparse_downsample(x, torch.zeros_like(m), w, b, stride=2, backend=backend)
    assert not bool(mask_out.any()) and bool((y == 0).all())
    y16, _ = tcm_kernels.sparse_downsample(x.half(), m, w.half(), b.half(), stride=2, backend=backend)
    y_ref, _ = ref.sparse_downsample(x, m, w, b, stride=2)
    assert y16.dtype == torch.float16
    assert_close_verbose(y16, y_ref, atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1], name="fp16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_downsample_torch_compile(backend):
    x, m, _, b = make_case(2, 4, 6, 1, spatial=(8, 6))
    w = torch.randn(6, 4, 2, 2)
    compiled = torch.compile(lambda *a: tcm_kernels.sparse_downsample(*a, stride=2, backend=backend), fullgraph=True,
                             backend="aot_eager")
    y, mask_out = compiled(x, m, w, b)
    y_ref, mask_ref = ref.sparse_downsample(x, m, w, b, stride=2)
    assert torch.equal(mask_out, mask_ref)
    assert_close_verbose(y, y_ref, atol=2e-5, rtol=2e-5, name="compiled downsample")


def test_space_to_depth_is_the_strided_conv():
    """conv(k = s, stride s) == 1x1 conv of space_to_depth with weight.reshape(Cout, Cin s^d, 1, ...)."""
    for nd, spatial in [(2, (6, 4)), (3, (2, 4, 6))]:
        x = torch.randn(2, 3, *spatial, dtype=torch.float64)
        w = torch.randn(5, 3, *(2,) * nd, dtype=torch.float64)
        conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d
        torch.testing.assert_close(conv(space_to_depth(x, 2), w.reshape(5, -1, *(1,) * nd)), conv(x, w, stride=2))


# ---- compact layout: submanifold_conv_compact vs the dense reference at the same sites ----------------------

COMPACT_BACKENDS = [pytest.param("reference", id="reference"), backend_param("submconv_compact_forward", "cpu")]


def compact_case(nd, cin, cout, k, groups=1, dtype=torch.float32, spatial=None, shuffle=True, seed=0, density=0.5):
    """(SparseTensor with rows in random order, weight, bias, dense x, mask)."""
    x, m, w, b = make_case(nd, cin, cout, k, groups, dtype=dtype, spatial=spatial, seed=seed)
    if density != 0.5:
        m = random_mask(x.shape, density=density, seed=seed)
    st = tcm_kernels.SparseTensor.from_dense(x, m)
    if shuffle:
        perm = torch.randperm(st.features.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        st = tcm_kernels.SparseTensor(st.features[perm], st.coords[perm], st.spatial_shape, st.batch_size)
    return st, w, b, x, m


def rows_at(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] -> [N, C], the rows at coords (batch, *spatial)."""
    return dense.movedim(1, -1)[tuple(coords.long().unbind(1))]


def dense_from_rows(st, features):
    return tcm_kernels.SparseTensor(features, st.coords, st.spatial_shape, st.batch_size).dense()[0]


@pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])
@pytest.mark.parametrize("nd,k,dilation,spatial", [(2, 1, 1, None), (2, 3, 1, None), (2, 3, 2, None),
                                                   (2, 7, 1, (13, 17)), (3, 1, 1, None), (3, 3, 1, None),
                                                   (3, 5, 2, None)])
@pytest.mark.parametrize("cin,cout,groups", [(5, 7, 1), (6, 4, 2), (6, 6, 6), (4, 8, 4)],
                         ids=["dense", "grouped", "depthwise", "depthwise_x2"])
def test_compact_forward_backward_vs_reference(backend, nd, k, dilation, spatial, cin, cout, groups):
    st, w, b, _, m = compact_case(nd, cin, cout, k, groups, spatial=spatial)
    km = st.kernel_map()
    f, ws, bs = (t.clone().requires_grad_() for t in (st.features, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (dense_from_rows(st, st.features), w, b))
    y = tcm_kernels.submanifold_conv_compact(f, km, ws, bs, dilation=dilation, groups=groups, backend=backend)
    y_dense = ref.submanifold_conv(xr, m, wr, br, dilation=dilation, groups=groups)
    assert y.shape == (st.features.shape[0], cout)
    assert_close_verbose(y, rows_at(y_dense, st.coords), atol=2e-4, rtol=2e-4, name="y")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(grad)
    y_dense.backward(dense_from_rows(st, grad))
    for name, a, e in [("grad_features", f.grad, rows_at(xr.grad, st.coords)), ("grad_w", ws.grad, wr.grad),
                       ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-4, rtol=5e-4, name=name)


@pytest.mark.parametrize("nd,k,dilation,cin,cout,groups", [(2, 3, 2, 6, 4, 2), (3, 3, 1, 4, 8, 4)])
def test_compact_reference_vs_dense_reference(nd, k, dilation, cin, cout, groups):
    """The compact reference back end (the oracle of the Triton compact tests) on a grouped and a depthwise case."""
    test_compact_forward_backward_vs_reference("reference", nd, k, dilation, None, cin, cout, groups)


@pytest.mark.parametrize("backend", COMPACT_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("nd", [2, 3])
def test_compact_dtypes_vs_reference(backend, dtype, nd):
    st, w, b, x, m = compact_case(nd, 8, 12, 3, dtype=dtype)
    y = tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), w, b, backend=backend)
    assert y.dtype == dtype
    y_ref = ref.submanifold_conv(x.float() * m, m, w.float(), b.float())
    atol, rtol = TOL[dtype]
    assert_close_verbose(y, rows_at(y_ref, st.coords), atol=atol, rtol=rtol, name=str(dtype))


@pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_half_precision_error_rule(backend, dtype):
    """Our fp16/bf16 error vs an fp64 oracle is at most 2x the same-dtype dense conv's (forward and grads)."""
    st, w, b, _, m = compact_case(2, 16, 16, 3, spatial=(12, 12))
    km = st.kernel_map()
    grad = torch.randn((st.features.shape[0], 16), generator=torch.Generator().manual_seed(1))

    def run_compact(dt):
        f, wi, bi = (t.to(dt).requires_grad_() for t in (st.features, w, b))
        y = tcm_kernels.submanifold_conv_compact(f, km, wi, bi, backend=backend)
        y.backward(grad.to(dt))
        return [t.double() for t in (y, f.grad, wi.grad, bi.grad)]

    def run_dense(dt):
        xi, wi, bi = (t.to(dt).requires_grad_() for t in (dense_from_rows(st, st.features), w, b))
        y = ref.submanifold_conv(xi, m, wi, bi)
        y.backward(dense_from_rows(st, grad).to(dt))
        return [t.double() for t in (rows_at(y, st.coords), rows_at(xi.grad, st.coords), wi.grad, bi.grad)]

    oracle, ours, dense = run_dense(torch.float64), run_compact(dtype), run_dense(dtype)
    for name, o, d, e in zip(("y", "grad_features", "grad_w", "grad_b"), ours, dense, oracle):
        err, dense_err = (o - e).abs().max().item(), (d - e).abs().max().item()
        assert err <= 2 * dense_err + 1e-6, f"{name}: ours {err:.3e} > 2 x dense {dense_err:.3e}"


@pytest.mark.parametrize("backend", COMPACT_BACKENDS)
def test_compact_empty_and_empty_image(backend):
    st, w, b, x, m = compact_case(2, 4, 6, 3)
    empty = tcm_kernels.SparseTensor(st.features[:0].clone().requires_grad_(), st.coords[:0], st.spatial_shape, 2)
    ws = w.clone().requires_grad_()
    y = tcm_kernels.submanifold_conv_compact(empty.features, empty.kernel_map(), ws, b, backend=backend)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert bool((ws.grad == 0).all()) and empty.features.grad.shape == (0, 4)
    m_one = m.clone()
    m_one[1] = False  # the second image has no active site
    one = tcm_kernels.SparseTensor.from_dense(x, m_one)
    y = tcm_kernels.submanifold_conv_compact(one.features, one.kernel_map(), w, b, backend=backend)
    assert_close_verbose(y, rows_at(ref.submanifold_conv(x, m_one, w, b), one.coords), atol=2e-4, rtol=2e-4,
                         name="empty image")


@pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])
def test_compact_equals_masked_dense_engine_and_is_deterministic(backend):
    """Same engine: sorted compact rows give exactly the masked-dense op's rows; weight grad is bitwise stable."""
    st, w, b, x, m = compact_case(2, 16, 16, 3, spatial=(24, 24), shuffle=False)
    y = tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), w, b, backend=backend, chunk_rows=16)
    assert torch.equal(y, rows_at(tcm_kernels.submanifold_conv(x, m, w, b, backend=backend, chunk_rows=16), st.coords))
    grads, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            ws = w.clone().requires_grad_()
            tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), ws, b, backend=backend,
                                                 chunk_rows=16).sum().backward()
            grads.append(ws.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_compact_gradcheck_reference_fp64():
    st, w, b, _, _ = compact_case(2, 2, 2, 3, spatial=(4, 3), dtype=torch.float64)
    km = st.kernel_map()
    args = [t.clone().requires_grad_() for t in (st.features, w, b)]
    assert torch.autograd.gradcheck(
        lambda f, wi, bi: tcm_kernels.submanifold_conv_compact(f, km, wi, bi, backend="reference"), args)
    st3, w3, b3, _, _ = compact_case(3, 2, 2, 3, groups=2, spatial=(2, 3, 3), dtype=torch.float64)
    km3 = st3.kernel_map()
    args = [t.clone().requires_grad_() for t in (st3.features, w3, b3)]
    assert torch.autograd.gradcheck(
        lambda f, wi, bi: tcm_kernels.submanifold_conv_compact(f, km3, wi, bi, groups=2, backend="reference"), args)


@pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])
def test_compact_opcheck(backend):
    st, w, b, _, _ = compact_case(2, 4, 6, 3)
    grid, sites = st.kernel_map()
    f = st.features.clone()
    torch.library.opcheck(torch.ops.tcm.submconv_compact_forward.default,
                          (f.requires_grad_(), grid, sites, w.clone().requires_grad_(), b.clone().requires_grad_(),
                           [1, 2], 1, 0))
    g = torch.randn(f.shape[0], 6)
    torch.library.opcheck(torch.ops.tcm.submconv_compact_weight_grad.default,
                          (g, f.detach(), grid, sites, w, [1, 1], 1, 0))
    st3, w3, b3, _, _ = compact_case(3, 4, 4, 3, groups=4)
    g3, s3 = st3.kernel_map()
    torch.library.opcheck(torch.ops.tcm.submconv_compact_forward.default,
                          (st3.features.clone().requires_grad_(), g3, s3, w3.clone().requires_grad_(), b3,
                           [1, 1, 1], 4, 0))


@pytest.mark.parametrize("backend", COMPACT_BACKENDS)
def test_compact_torch_compile_two_layer_block(backend):
    """The kernel map is built outside the compiled region (N is data-dependent); the block itself is one graph."""
    st, w1, b1, _, _ = compact_case(2, 4, 8, 3, seed=1)
    w2 = torch.randn(8, 8, 3, 3) / 8
    km = st.kernel_map()

    def block(f, kmap, wa, ba, wb):
        h = torch.relu(tcm_kernels.submanifold_conv_compact(f, kmap, wa, ba, backend=backend))
        return tcm_kernels.submanifold_conv_compact(h, kmap, wb, dilation=2, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (st.features, w1, b1, w2)]
    args_c = [t.clone().requires_grad_() for t in (st.features, w1, b1, w2)]
    y = block(args[0], km, *args[1:])
    y_c = compiled(args_c[0], km, *args_c[1:])
    assert_close_verbose(y_c, y, atol=1e-5, rtol=1e-5, name="compiled")
    y.sum().backward()
    y_c.sum().backward()
    for a, e in zip(args_c, args):
        assert_close_verbose(a.grad, e.grad, atol=1e-5, rtol=1e-5, name="compiled grad")


def test_kernel_map_from_coords():
    st, _, _, _, m = compact_case(3, 2, 2, 1)
    grid, sites = st.kernel_map()
    assert st.kernel_map() is st.kernel_map(), "cached"
    assert grid.shape == (2, *m.shape[2:]) and grid.dtype == torch.int32 and sites.dtype == torch.int64
    assert torch.equal(grid >= 0, m[:, 0])
    assert torch.equal(grid.flatten()[sites], torch.arange(st.features.shape[0], dtype=torch.int32))
    assert st.replace_features(st.features * 2).kernel_map() is st.kernel_map(), "replace_features carries the map"
    with pytest.raises(ValueError, match="coords must be unique, got 1 duplicate"):
        tcm_kernels.KernelMap.from_coords(torch.tensor([[0, 1, 1], [0, 1, 1]]), (4, 4), 1)
    with pytest.raises(ValueError, match="coords must lie in"):
        tcm_kernels.KernelMap.from_coords(torch.tensor([[0, 1, 4]]), (4, 4), 1)
    with pytest.raises(ValueError, match="coords must lie in"):
        tcm_kernels.KernelMap.from_coords(torch.tensor([[1, 1, 1]]), (4, 4), 1)


@pytest.mark.parametrize("backend", COMPACT_BACKENDS)
def test_compact_bad_input(backend):
    st, w, b, _, _ = compact_case(2, 4, 6, 3)
    km, f = st.kernel_map(), st.features
    conv = tcm_kernels.submanifold_conv_compact
    with pytest.raises(TypeError, match="kernel_map must be a KernelMap"):
        conv(f, tuple(km), w, backend=backend)
    with pytest.raises(ValueError, match="features must be 2-D"):
        conv(f[None], km, w, backend=backend)
    with pytest.raises(ValueError, match="one entry per row of features"):
        conv(f[:-1], km, w, backend=backend)
    with pytest.raises(TypeError, match="kernel_map.grid must have dtype in \\(int32\\)"):
        conv(f, tcm_kernels.KernelMap(km.grid.long(), km.sites), w, backend=backend)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        conv(f, km, torch.randn(6, 4, 3, 3, 3), backend=backend)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        conv(f, km, torch.randn(6, 4, 2, 2), backend=backend)
    with pytest.raises(ValueError, match="weight must be \\[Cout, Cin/groups"):
        conv(f, km, w, groups=2, backend=backend)
    with pytest.raises(ValueError, match="bias must be \\[Cout=6\\]"):
        conv(f, km, w, b[:3], backend=backend)
    with pytest.raises(TypeError, match="weight must have dtype in \\(float32\\)"):
        conv(f, km, w.half(), backend=backend)
    with pytest.raises(ValueError, match="submanifold_conv_compact: dilation must be a positive int or 2"):
        conv(f, km, w, dilation=(1, 0), backend=backend)
    with pytest.raises(ValueError, match="tensors must be on one device"):
        conv(f, km, w.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])
def test_compact_op_rejects_inconsistent_maps(backend):
    """The compiled op bounds grid and sites itself: a bad map must never reach the engine."""
    st, w, _, _, _ = compact_case(2, 4, 6, 3)
    with pytest.raises(TypeError, match="submanifold_conv_compact: backend='cpu' supports float32"):
        tcm_kernels.submanifold_conv_compact(st.features.double(), st.kernel_map(), w.double(), backend=backend)
    grid, sites = st.kernel_map()
    op = torch.ops.tcm.submconv_compact_forward
    with pytest.raises(ValueError, match="grid must hold rows < N"):
        op(st.features, grid.clone().fill_(st.features.shape[0]), sites, w, None, [1, 1], 1, 0)
    with pytest.raises(ValueError, match="sites must be linear sites in"):
        op(st.features, grid, sites + grid.numel(), w, None, [1, 1], 1, 0)
    with pytest.raises(ValueError, match="grad_out must be \\[N="):
        torch.ops.tcm.submconv_compact_weight_grad(torch.zeros(1, 6), st.features, grid, sites, w, [1, 1], 1, 0)


# ---- sparse downsample on the compact layout -------------------------------------------------------------


@pytest.mark.parametrize("nd,spatial,stride", [(2, (8, 12), 2), (2, (9, 6), 3), (3, (4, 6, 8), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_downsample_compact_vs_dense_oracle(nd, spatial, stride, dtype):
    st, _, b, _, m = compact_case(nd, 5, 7, 1, spatial=spatial, dtype=dtype)
    w = (torch.randn(7, 5, *(stride,) * nd) / (5 * stride**nd) ** 0.5).to(dtype)
    f, ws, bs = (t.clone().requires_grad_() for t in (st.features, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (dense_from_rows(st, st.features), w, b))
    out = tcm_kernels.sparse_downsample_compact(
        tcm_kernels.SparseTensor(f, st.coords, st.spatial_shape, st.batch_size), ws, bs, stride=stride)
    y_ref, mask_ref = ref.sparse_downsample(xr, m, wr, br, stride=stride)
    assert out.spatial_shape == tuple(s // stride for s in spatial) and out.batch_size == 2
    expected = tcm_kernels.SparseTensor.from_dense(y_ref, mask_ref)
    assert torch.equal(out.coords, expected.coords), "coarse sites, ascending (batch, *spatial)"
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert_close_verbose(out.features, expected.features, atol=tol, rtol=tol, name="y")
    grid, sites = out.kernel_map()
    assert torch.equal(grid >= 0, mask_ref[:, 0]) and torch.equal(grid.flatten()[sites], torch.arange(len(sites)).int())
    grad = torch.randn(out.features.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    out.features.backward(grad)
    y_ref.backward(dense_from_rows(out, grad))
    for name, a, e in [("grad_features", f.grad, rows_at(xr.grad, st.coords)), ("grad_w", ws.grad, wr.grad),
                       ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=tol * 2, rtol=tol * 2, name=name)


def test_sparse_downsample_compact_is_deterministic():
    """Forward and all gradients bitwise equal across runs and thread counts, under deterministic-algorithms mode."""
    st, _, _, _, _ = compact_case(2, 16, 24, 1, spatial=(12, 16))
    w, b = torch.randn(24, 16, 2, 2), torch.randn(24)
    results, threads, was_deterministic = [], torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            f, ws, bs = (t.clone().requires_grad_() for t in (st.features, w, b))
            out = tcm_kernels.sparse_downsample_compact(
                tcm_kernels.SparseTensor(f, st.coords, st.spatial_shape, st.batch_size), ws, bs, stride=2)
            out.features.square().sum().backward()
            results.append((out.features.detach(), f.grad, ws.grad, bs.grad))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    assert all(torch.equal(a, e) for r in results[1:] for a, e in zip(r, results[0]))


def test_sparse_downsample_compact_empty_and_errors():
    st, _, b, _, _ = compact_case(2, 4, 6, 1, spatial=(6, 8))
    empty = tcm_kernels.SparseTensor(st.features[:0], st.coords[:0], st.spatial_shape, 2)
    out = tcm_kernels.sparse_downsample_compact(empty, torch.randn(6, 4, 2, 2), b, stride=2)
    assert out.features.shape == (0, 6) and out.coords.shape == (0, 3) and out.spatial_shape == (3, 4)
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        tcm_kernels.sparse_downsample_compact(st.features, torch.randn(6, 4, 2, 2), stride=2)
    with pytest.raises(ValueError, match="weight kernel must equal the stride"):
        tcm_kernels.sparse_downsample_compact(st, torch.randn(6, 4, 3, 3), stride=2)
    with pytest.raises(ValueError, match="stride 4 must divide"):
        tcm_kernels.sparse_downsample_compact(st, torch.randn(6, 4, 4, 4), stride=4)
    with pytest.raises(ValueError, match="weight must be \\[Cout, Cin/groups, \\*k\\] with Cin=4"):
        tcm_kernels.sparse_downsample_compact(st, torch.randn(6, 3, 2, 2), stride=2)


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
    x, m, w, b = (t.to(device) for t in make_case(2, 4, 4, 3, spatial=(5, 6)))
    empty = torch.zeros_like(m)
    assert bool((tcm_kernels.submanifold_conv(x, empty, w, b, backend=backend) == 0).all())
    torch.library.opcheck(torch.ops.tcm.submconv_forward_triton.default,
                          (x.requires_grad_(), m, w.requires_grad_(), b, [1, 1], 1, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("nd,cin,cout,groups,k,dilation", [(2, 5, 7, 1, 3, 1), (3, 4, 6, 2, 3, 2), (2, 6, 6, 6, 5, 1)])
def test_triton_compact_vs_reference(backend, device, nd, cin, cout, groups, k, dilation):
    st, w, b, _, _ = compact_case(nd, cin, cout, k, groups, spatial=(9, 7) if nd == 2 else (4, 5, 3))
    km = tcm_kernels.KernelMap(*(t.to(device) for t in st.kernel_map()))
    f, ws, bs = (t.to(device).clone().requires_grad_() for t in (st.features, w, b))
    fr, wr, br = (t.clone().requires_grad_() for t in (st.features, w, b))
    y = tcm_kernels.submanifold_conv_compact(f, km, ws, bs, groups=groups, dilation=dilation, backend=backend)
    y_ref = tcm_kernels.submanifold_conv_compact(fr, st.kernel_map(), wr, br, groups=groups, dilation=dilation,
                                                 backend="reference")
    assert_close_verbose(y, y_ref, atol=2e-5, rtol=2e-5, name="y")
    grad = torch.randn(y_ref.shape)
    y.backward(grad.to(device))
    y_ref.backward(grad)
    for name, a, e in [("grad_features", f.grad, fr.grad), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-5, rtol=5e-5, name=name)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_compact_half_empty_and_opcheck(backend, device):
    st, w, b, _, _ = compact_case(2, 8, 8, 3, spatial=(8, 8))
    km = tcm_kernels.KernelMap(*(t.to(device) for t in st.kernel_map()))
    f, w, b = st.features.to(device), w.to(device), b.to(device)
    y16 = tcm_kernels.submanifold_conv_compact(f.half(), km, w.half(), b.half(), backend=backend)
    y_ref = tcm_kernels.submanifold_conv_compact(f, km, w, b, backend="reference")
    assert y16.dtype == torch.float16
    assert_close_verbose(y16, y_ref, atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1], name="fp16")
    empty = tcm_kernels.KernelMap(torch.full_like(km.grid, -1), km.sites[:0])
    assert tcm_kernels.submanifold_conv_compact(f[:0], empty, w, b, backend=backend).shape == (0, 8)
    torch.library.opcheck(torch.ops.tcm.submconv_compact_forward_triton.default,
                          (f.clone().requires_grad_(), *km, w.clone().requires_grad_(), b, [1, 1], 1, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.fixture(scope="module")
def ptx_report():
    """The kernel for sm_80 and sm_90 in every dtype, at the largest tiles the launcher picks (tests/triton_compile.py)."""
    pytest.importorskip("triton", reason="triton not installed")
    from tests.triton_compile import compile_kernels

    ints = ['n_rows', 'depth', 'height', 'width', 'cin', 'cout', 'cin_g', 'cout_g', 'taps']
    from tcm_kernels.triton.submconv import launch_tiles

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    jobs = []
    for cap in (80, 90):
        for dt in ("fp32", "fp16", "bf16"):
            block_m, block_n, block_k, warps = launch_tiles(1024, 1024, torch_dtype[dt])  # the largest tiles
            signature = {**{"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": "*fp32", "y_ptr": "*fp32", "grid_ptr": "*i32", "sites_ptr": "*i64", "offsets_ptr": "*i32"}, **{n: "i32" for n in ints}}
            jobs.append({"name": f"sm{cap}-{dt}", "kernel": "tcm_kernels.triton.submconv:_submconv_rows_kernel",
                         "signature": signature, "cap": cap, "options": {"num_warps": warps},
                         "constexprs": {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                        "BLOCK_K": block_k, "EMULATE_BF16": False}})
    return compile_kernels(jobs, want_ptx=True)


@pytest.mark.parametrize("cap", [80, 90])
def test_triton_kernel_compiles_to_ptx(ptx_report, cap):
    """Compiles; fp16/bf16 dots run on tensor cores (mma / wgmma in the PTX), fp32 dots do not (IEEE, no
    TF32); no spills and shared memory within the target's limit."""
    from tests.triton_compile import assert_conv_kernel

    for dt in ("fp32", "fp16", "bf16"):
        assert_conv_kernel(ptx_report[f"sm{cap}-{dt}"], cap, tensor_cores=dt != "fp32")

# ---- CUDA kernels (csrc/submconv/submconv_cuda.cu): run by `make gpu-check` ------------------------

CUDA = backend_param(OP, "cuda")


def test_cuda_kernels_serve_cuda_tensors_without_triton(monkeypatch):
    """Dispatch rule: Triton for CUDA tensors; the compiled CUDA kernels when Triton is missing."""
    from tcm_kernels import _backend

    monkeypatch.setattr(_backend, "compiled_available", lambda op, device_type="cpu": True)
    cuda = torch.device("cuda")
    assert _backend.choose_backend(OP, cuda, None, has_cuda_kernel=True) == "triton"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert _backend.choose_backend(OP, cuda, None, has_cuda_kernel=True) == "cuda"
    assert _backend.choose_backend("submconv_compact_forward", cuda, None, has_cuda_kernel=False) == "reference"


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("nd,cin,cout,groups,k,dilation", [(2, 5, 7, 1, 3, 1), (3, 4, 6, 2, 3, 2), (2, 6, 6, 6, 5, 1),
                                                           (3, 8, 16, 1, 3, 1)])
def test_cuda_forward_backward_vs_fp64_reference(backend, nd, cin, cout, groups, k, dilation):
    x, m, w, b = make_case(nd, cin, cout, k, groups, spatial=(9, 7) if nd == 2 else (4, 5, 3))
    dev = torch.device("cuda")
    xs, ws, bs = (t.to(dev).requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    y = tcm_kernels.submanifold_conv(xs, m.to(dev), ws, bs, groups=groups, dilation=dilation, backend=backend)
    y_ref = ref.submanifold_conv(xr, m, wr, br, groups=groups, dilation=dilation)
    assert_close_verbose(y, y_ref, atol=2e-5, rtol=2e-5, name="y")
    grad = torch.randn(y_ref.shape, dtype=torch.float64)
    y.backward(grad.float().to(dev))
    y_ref.backward(grad)
    for name, a, e in [("grad_x", xs.grad, xr.grad), ("grad_w", ws.grad, wr.grad), ("grad_b", bs.grad, br.grad)]:
        assert_close_verbose(a, e, atol=5e-5, rtol=5e-5, name=name)
