"""Sparse (masked) normalizations and densify: every back end against the reference.

Independent oracles as well: SparK's own nonzero-gather batch norm (x[mask] ->
nn.BatchNorm1d -> scatter), nn.BatchNorm2d on an all-active mask, and float64.
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels.nn import (SparseBatchNorm2d, SparseBatchNorm3d, SparseGroupNorm, SparseInstanceNorm2d,
                            SparseInstanceNorm3d, SparseLayerNorm)
from tests.utils import assert_close_verbose, backend_param, loss_weights, sync_batch_norm_ranks

OP = "masked_moments"
BACKENDS = [backend_param(OP, "reference"), backend_param(OP, "cpu"), backend_param(OP, "triton")]
KERNEL_BACKENDS = BACKENDS[1:]
# Outputs are O(1) normalized values: fp32 differences come from summation order; fp16/bf16 from
# rounding the output (and the rounded input feeding different but equally valid fp32 math).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2),
       torch.float64: (1e-10, 1e-10)}
SHAPES_2D = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 4, 13, 17), (2, 5, 33, 31)]
SHAPES_3D = [(2, 3, 4, 5, 6), (1, 2, 3, 1, 7)]


def _inputs(shape, dtype, *, seed=0, keep=0.6, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype)
    mask = torch.rand((shape[0], 1, *shape[2:]), generator=g) < keep
    mask.view(shape[0], -1)[:, 0] = True  # every sample keeps one active site (empty cases tested apart)
    c = shape[1]
    weight = (torch.rand(c, generator=g) + 0.5).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    return x, mask, weight, bias


def _norm_fns(backend):
    return {
        "batch": lambda x, m, w, b: tcm_kernels.sparse_batch_norm(x, m, None, None, w, b, True, backend=backend),
        "instance": lambda x, m, w, b: tcm_kernels.sparse_instance_norm(x, m, w, b, backend=backend),
        "group": lambda x, m, w, b: tcm_kernels.sparse_group_norm(x, m, 1 if x.shape[1] % 2 else 2, w, b,
                                                                  backend=backend),
    }


def _out_and_grads(fn, x, mask, w, b, seed=1):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, mask, w, b)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad((y.float() * go.float()).sum(), (x, w, b))
    return (y, *grads)


# ---------------------------------------------------------------------------------------------- vs reference

# the interpreted Triton runs see fewer shapes: it is ~100x slower than the compiled kernels
CASES = [pytest.param(b.values[0], s, marks=b.marks, id=f"{b.id}-{'x'.join(map(str, s))}")
         for b in KERNEL_BACKENDS
         for s in (SHAPES_2D[:3] + SHAPES_3D if b.id == "cpu" else [SHAPES_2D[1], SHAPES_2D[2], SHAPES_3D[1]])]


@pytest.mark.parametrize("backend,shape", CASES)
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_match_reference(backend, kind, dtype, shape):
    x, mask, w, b = _inputs(shape, dtype)
    got = _out_and_grads(_norm_fns(backend)[kind], x, mask, w, b)
    want = _out_and_grads(_norm_fns("reference")[kind], x, mask, w, b)
    atol, rtol = TOL[dtype]
    scale = [1.0, 1.0, float(mask.sum()) ** 0.5, float(mask.sum()) ** 0.5]  # dw, db are sums over active sites
    for name, g, r, s in zip(("y", "dx", "dw", "db"), got, want, scale):
        assert g.dtype == r.dtype, name
        assert_close_verbose(g, r, atol=atol * s, rtol=rtol, name=f"{kind} {name}")
    assert torch.all(got[0][~mask.expand_as(x)] == 0), "inactive sites must be exactly 0"
    assert torch.all(got[1][~mask.expand_as(x)] == 0), "no gradient to inactive sites"


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_bigger_plane_matches_reference(backend, kind):
    """Planes longer than a kernel chunk/tile (512 / 1024 sites), with uneven tails."""
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing masked_moments)")
    x, mask, w, b = _inputs((2, 4, 45, 53), torch.float32, keep=0.4)
    for g, r in zip(_out_and_grads(_norm_fns(backend)[kind], x, mask, w, b),
                    _out_and_grads(_norm_fns("reference")[kind], x, mask, w, b)):
        assert_close_verbose(g, r, atol=1e-4, rtol=1e-4, name=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_gradcheck_fp64(backend, kind):
    x, mask, w, b = _inputs((2, 2, 3, 4), torch.float64, keep=0.5)
    fn = _norm_fns(backend)[kind]
    # fast mode (random projections) for the interpreted Triton kernels: the full Jacobian takes minutes
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, mask, w, b),
                                    tuple(t.clone().requires_grad_() for t in (x, w, b)),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_mean_keeps_variance(backend):
    """A mean of 1e4 over unit noise: sum(x^2) - n mean^2 in fp32 would lose all the variance."""
    x, mask, w, b = _inputs((2, 3, 16, 16), torch.float32, offset=1e4)
    oracle = tcm_kernels.sparse_batch_norm(x.double(), mask, backend="reference")
    got = tcm_kernels.sparse_batch_norm(x, mask, backend=backend)
    # fp32 input quantisation at 1e4 is 1e-3 absolute; over a std of 2 that is 5e-4 in the output
    assert_close_verbose(got, oracle, atol=2e-3, rtol=0, name="large mean")
    naive_var = (x.double() ** 2).float().mean() - x.mean() ** 2  # what the textbook shortcut gives in fp32
    assert abs(float(naive_var) - 4.0) > 0.5, "the test input must defeat the naive formula"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    """flash-attention rule against SparK's gather BN run in the same dtype (what users get today)."""
    x, mask, w, b = _inputs((4, 8, 12, 12), torch.float64)
    oracle = _spark_gather_bn(x, mask, w, b)
    ours = tcm_kernels.sparse_batch_norm(x.to(dtype), mask, None, None, w.to(dtype), b.to(dtype), backend=backend)
    theirs = _spark_gather_bn(x.to(dtype), mask, w.to(dtype), b.to(dtype))
    err_ours = (ours.double() - oracle).abs().max().item()
    err_pt = (theirs.double() - oracle).abs().max().item()
    assert err_ours <= 2 * err_pt, (err_ours, err_pt)


# ---------------------------------------------------------------------------------------------- independent oracles

def _spark_gather_bn(x, mask, weight, bias, bn=None):
    """SparK's SparseBatchNorm2d: gather active sites, BatchNorm1d, scatter back."""
    c = x.shape[1]
    if bn is None:
        bn = torch.nn.BatchNorm1d(c, dtype=x.dtype)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    xl = x.movedim(1, -1)
    m = mask.squeeze(1)
    out = torch.zeros_like(xl)
    out[m] = bn(xl[m])
    return out.movedim(-1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module_cls,shape", [(SparseBatchNorm2d, (3, 4, 9, 11)), (SparseBatchNorm3d, (2, 3, 4, 5, 6))])
def test_module_matches_spark_gather_and_running_stats(backend, module_cls, shape):
    x, mask, w, b = _inputs(shape, torch.float32)
    ref_bn = torch.nn.BatchNorm1d(shape[1])
    ours = module_cls(shape[1], backend=backend)
    with torch.no_grad():
        for mod in (ref_bn, ours):
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    for step in range(3):
        xs = x + step
        want = _spark_gather_bn(xs, mask, None, None, bn=ref_bn)
        assert_close_verbose(ours(xs, mask), want, atol=1e-5, rtol=1e-5, name=f"train step {step}")
    assert_close_verbose(ours.running_mean, ref_bn.running_mean, atol=1e-5, rtol=1e-5, name="running_mean")
    assert_close_verbose(ours.running_var, ref_bn.running_var, atol=1e-5, rtol=1e-5, name="running_var")
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    ref_bn.eval()
    assert_close_verbose(ours(x, mask), _spark_gather_bn(x, mask, None, None, bn=ref_bn), atol=1e-5, rtol=1e-5,
                         name="eval")


def test_all_active_equals_dense_batchnorm_and_momentum_none():
    x, _, w, b = _inputs((4, 3, 6, 7), torch.float32)
    mask = torch.ones(4, 1, 6, 7, dtype=torch.bool)
    dense, ours = torch.nn.BatchNorm2d(3, momentum=None), SparseBatchNorm2d(3, momentum=None)
    ours.load_state_dict(dense.state_dict())  # same buffers and parameters: dense checkpoints load
    for step in range(2):
        assert_close_verbose(ours(x * (step + 1), mask), dense(x * (step + 1)), atol=1e-5, rtol=1e-5, name="y")
    assert_close_verbose(ours.running_var, dense.running_var, atol=1e-5, rtol=1e-5, name="running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_uses_running_stats_and_gradients(backend):
    x, mask, w, b = _inputs((2, 3, 5, 6), torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return tcm_kernels.sparse_batch_norm(x, mask, rm, rv, w, b, training=False, backend=backend)

    want = ((x - rm.view(1, 3, 1, 1)) / (rv.view(1, 3, 1, 1) + 1e-5).sqrt() * w.view(1, 3, 1, 1)
            + b.view(1, 3, 1, 1)) * mask
    assert_close_verbose(fn(x, w, b), want, atol=1e-12, rtol=1e-12, name="eval")
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, w, b)),
                                    fast_mode=backend == "triton")  # interpreted Triton: see test_gradcheck_fp64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", ["sparse_instance_norm", "sparse_group_norm"])
def test_instance_group_norm_with_an_empty_sample(backend, fn_name):
    x, mask, w, b = _inputs((3, 4, 5, 5), torch.float32)
    mask[1] = False
    args = (2,) if fn_name == "sparse_group_norm" else ()
    x.requires_grad_()
    y = getattr(tcm_kernels, fn_name)(x, mask, *args, w, b, backend=backend)
    assert torch.isfinite(y).all() and torch.all(y[1] == 0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and torch.all(gx[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_equals_per_sample_dense_instance_norm(backend):
    x, mask, _, _ = _inputs((2, 3, 6, 5), torch.float64, keep=1.0)
    mask[:] = True
    assert_close_verbose(tcm_kernels.sparse_instance_norm(x, mask, backend=backend),
                         torch.nn.functional.instance_norm(x), atol=1e-10, rtol=1e-10, name="instance")
    assert_close_verbose(tcm_kernels.sparse_group_norm(x, mask, 3, backend=backend),
                         torch.nn.functional.group_norm(x, 3), atol=1e-10, rtol=1e-10, name="group")


def test_instance_norm_3d_module_and_group_norm_module():
    x, mask, _, _ = _inputs((2, 4, 3, 4, 5), torch.float32)
    m = SparseInstanceNorm3d(4, affine=True)
    assert_close_verbose(m(x, mask), tcm_kernels.sparse_instance_norm(x, mask, m.weight, m.bias, backend="reference"),
                         atol=1e-5, rtol=1e-5, name="in3d")
    gn = SparseGroupNorm(2, 4)
    assert_close_verbose(gn(x, mask), tcm_kernels.sparse_group_norm(x, mask, 2, backend="reference"), atol=1e-5,
                         rtol=1e-5, name="gn")
    with pytest.raises(ValueError, match="SparseInstanceNorm2d: x must be 4-D"):
        SparseInstanceNorm2d(4)(x, mask)
    with pytest.raises(ValueError, match="SparseBatchNorm2d: x must be 4-D"):
        SparseBatchNorm2d(4)(x, mask)


# ---------------------------------------------------------------------------------------------- layer norm, densify

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm(dtype, channels_last):
    x, mask, w, b = _inputs((2, 5, 4, 7), dtype)
    if channels_last:
        x, mask = x.movedim(1, -1).contiguous(), mask.movedim(1, -1).contiguous()
    ln = SparseLayerNorm(5, data_format="channels_last" if channels_last else "channels_first").to(dtype)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    got = ln(x, mask)
    want = tcm_kernels.sparse_layer_norm(x, mask, w, b, 1e-6, channels_last=channels_last, backend="reference")
    atol, rtol = TOL[dtype]
    assert_close_verbose(got, want, atol=atol, rtol=rtol, name="layer norm")
    assert torch.all(got[~mask.expand_as(x)] == 0)
    x64 = x[:1, :3].double().requires_grad_() if not channels_last else x[:1, :2].double().requires_grad_()
    mask = mask[:1, :1] if not channels_last else mask[:1, :2]
    assert torch.autograd.gradcheck(lambda t: tcm_kernels.sparse_layer_norm(t, mask, channels_last=channels_last),
                                    (x64,))


def test_densify_values_and_gradients():
    x, mask, _, _ = _inputs((2, 3, 4, 5), torch.float64)
    token = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    y = tcm_kernels.densify(xr, mask, token)
    assert torch.equal(y, torch.where(mask, x, token.detach()))
    go = torch.randn_like(y)
    gx, gt = torch.autograd.grad((y * go).sum(), (xr, token))
    assert torch.equal(gx, go * mask)
    assert_close_verbose(gt.flatten(), (go * ~mask).sum((0, 2, 3)), atol=1e-12, rtol=1e-12, name="token grad")
    assert torch.autograd.gradcheck(lambda a, t: tcm_kernels.densify(a, mask, t), (xr, token))
    flat = tcm_kernels.densify(x, mask, token.detach().flatten())  # [C] works too
    assert torch.equal(flat, y.detach())


# ---------------------------------------------------------------------------------------------- bad input

def test_all_inactive_batch_raises_in_training_not_nan():
    x, mask, w, b = _inputs((2, 3, 4, 4), torch.float32)
    mask[:] = False
    for backend in ("reference", "cpu"):
        with pytest.raises(RuntimeError, match="sparse_batch_norm: the batch has no active site"):
            tcm_kernels.sparse_batch_norm(x, mask, backend=backend)
    bn = SparseBatchNorm2d(3).eval()
    assert torch.all(bn(x, mask) == 0)  # eval mode: running stats are defined, output is just 0


@pytest.mark.parametrize("call,err,match", [
    (lambda x, m: tcm_kernels.sparse_batch_norm(x, m[:, :, :2]), ValueError, r"mask must be \[B, 1, \*S\]"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x, m.float()), TypeError, "mask must have dtype in"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x[0], m), ValueError, "x must be 4-D or 5-D"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x.int(), m), TypeError, "x must have dtype"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x, m, weight=torch.ones(2)), ValueError, r"weight must be \[C\]"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x, m, torch.zeros(3)), ValueError, "must be given together"),
    (lambda x, m: tcm_kernels.sparse_batch_norm(x, m, training=False), ValueError, "training=False needs"),
    (lambda x, m: tcm_kernels.sparse_group_norm(x, m, 2), ValueError, "num_groups must be a positive int dividing"),
    (lambda x, m: tcm_kernels.sparse_instance_norm(x, m, backend="nope"), ValueError, "backend must be one of"),
    (lambda x, m: tcm_kernels.densify(x, m, torch.zeros(4)), ValueError, "mask_token must be"),
    (lambda x, m: tcm_kernels.sparse_layer_norm(x, m, channels_last=True), ValueError, r"mask must be \[B, \*S, 1\]"),
])
def test_errors(call, err, match):
    x, mask, _, _ = _inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(err, match=match):
        call(x, mask)


def test_compiled_kernel_checks():
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing masked_moments)")
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"masked_moments: mask must be \[B, L\]"):
        torch.ops.tcm.masked_moments(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="masked_scale_shift: scale must be Float"):
        p = torch.zeros(2, 3)
        torch.ops.tcm.masked_scale_shift(x, torch.ones(2, 5, dtype=torch.bool), p, p.double(), p)


# ---------------------------------------------------------------------------------------------- opcheck, compile

def _op_samples(dtype):
    x, mask, _, _ = _inputs((2, 3, 4, 5), dtype)
    x3, m2 = x.reshape(2, 3, 20), mask.reshape(2, 20)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = [torch.randn(2, 3, dtype=acc) for _ in range(4)]
    dy = torch.randn_like(x3)
    return {"masked_moments": (x3, m2), "masked_scale_shift": (x3, m2, p[0], p[1], p[2]),
            "masked_grad_moments": (dy, x3, m2, p[0]), "masked_norm_backward": (dy, x3, m2, *p)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["masked_moments", "masked_scale_shift", "masked_grad_moments",
                                  "masked_norm_backward"])
def test_opcheck_compiled(name, dtype):
    if not tcm_kernels._backend.compiled_available(name):
        pytest.skip(f"compiled kernels not built (tcm_kernels._C missing {name})")
    torch.library.opcheck(getattr(torch.ops.tcm, name), _op_samples(dtype)[name])


@pytest.mark.parametrize("name", ["masked_moments", "masked_scale_shift", "masked_grad_moments",
                                  "masked_norm_backward"])
def test_opcheck_triton(name):
    pytest.importorskip("triton")

    torch.library.opcheck(getattr(torch.ops.tcm, f"{name}_triton"), _op_samples(torch.float32)[name],
                          test_utils=("test_schema", "test_faketensor"))


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn = SparseBatchNorm2d(c)
        self.inorm = SparseInstanceNorm2d(c, affine=True)
        self.ln = SparseLayerNorm(c, data_format="channels_first")

    def forward(self, x, mask):
        h = self.conv(x * mask) * mask
        h = torch.relu(self.bn(h, mask))
        return self.ln(self.inorm(h, mask), mask)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, mask, _, _ = _inputs((2, 4, 8, 8), torch.float32)
    eager, compiled = _Block(4), _Block(4)
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe, mask), fn(xc, mask)
    assert_close_verbose(yc, ye, atol=1e-5, rtol=1e-5, name="compiled y")
    (ye ** 2).sum().backward()
    (yc ** 2).sum().backward()
    assert_close_verbose(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name="compiled dx")
    assert_close_verbose(compiled.bn.weight.grad, eager.bn.weight.grad, atol=1e-4, rtol=1e-4, name="compiled dw")
    assert_close_verbose(compiled.bn.running_var, eager.bn.running_var, atol=1e-6, rtol=1e-6, name="running_var")


def test_compile_inductor_functional():
    torch._dynamo.reset()
    x, mask, w, b = _inputs((2, 3, 6, 6), torch.float32)
    fn = torch.compile(lambda x: tcm_kernels.sparse_group_norm(x, mask, 3, w, b), fullgraph=True)
    assert_close_verbose(fn(x), tcm_kernels.sparse_group_norm(x, mask, 3, w, b), atol=1e-6, rtol=1e-6, name="gn")


# ---------------------------------------------------------------------------------------------- sync batch norm

def test_sync_batch_norm_two_ranks_equals_one_big_batch():
    x, mask, w, b = _inputs((4, 3, 5, 6), torch.float32)
    mask[2:] &= torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(3)) < 0.5  # uneven ranks
    parts = sync_batch_norm_ranks(list(zip(x.chunk(2), mask.chunk(2))), w, b)
    full = SparseBatchNorm2d(3)
    with torch.no_grad():
        full.weight.copy_(w)
        full.bias.copy_(b)
    xr = x.clone().requires_grad_()
    y = full(xr, mask)
    (y * torch.cat([loss_weights(part.shape) for part in x.chunk(2)])).sum().backward()  # the ranks' losses
    assert_close_verbose(torch.cat([p["y"] for p in parts]), y, atol=1e-5, rtol=1e-5, name="sync y")
    assert_close_verbose(torch.cat([p["dx"] for p in parts]), xr.grad, atol=1e-5, rtol=1e-5, name="sync dx")
    assert_close_verbose(parts[0]["dw"] + parts[1]["dw"], full.weight.grad, atol=1e-4, rtol=1e-4, name="sync dw")
    assert_close_verbose(parts[0]["rv"], full.running_var, atol=1e-6, rtol=1e-6, name="sync running_var")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(0, 1, 4, 4, dtype=torch.bool)
    y = tcm_kernels.sparse_instance_norm(x, mask, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert tcm_kernels.sparse_group_norm(x, mask, 3, backend=backend).shape == x.shape
    eval_y = tcm_kernels.sparse_batch_norm(x, mask, torch.zeros(3), torch.ones(3), training=False, backend=backend)
    assert eval_y.shape == x.shape
    with pytest.raises(ValueError, match="training needs at least one sample, channel and site"):
        tcm_kernels.sparse_batch_norm(x, mask, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_values_at_inactive_sites_are_ignored(backend, kind):
    """NaN/inf left at inactive sites never reach the statistics, the output or the gradient."""
    x, mask, w, b = _inputs((2, 3, 5, 6), torch.float32)
    dirty = x.clone()
    dirty[~mask.expand_as(x)] = float("nan")
    dirty[0, 0][~mask[0, 0]] = float("inf")
    clean = torch.where(mask, x, 0)
    for got, want in zip(_out_and_grads(_norm_fns(backend)[kind], dirty, mask, w, b),
                         _out_and_grads(_norm_fns("reference")[kind], clean, mask, w, b)):
        assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name=kind)
