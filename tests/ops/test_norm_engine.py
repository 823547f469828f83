"""The norm-statistics engine over rows (compact layout): primitives and compact norms on every back end.

The masked-dense adapters of the same engine are tested in tests/ops/test_sparse_norm.py and the
modules on SparseTensors (both layouts agreeing) in tests/nn/test_sparse_norm_compact.py.
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels.ops import sparse_norm_compact as FC
from tcm_kernels.reference import sparse_norm as ref
from tests.utils import assert_close_verbose, backend_param, loss_weights

OP = "segment_moments"
BACKENDS = [backend_param(OP, "reference"), backend_param(OP, "cpu"), backend_param(OP, "triton")]
KERNEL_BACKENDS = BACKENDS[1:]
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}
_PRIM = ("moments", "scale_shift", "grad_moments", "norm_backward")


def _op(name: str, backend: str):
    return getattr(torch.ops.tcm, f"segment_{name}" + ("_triton" if backend == "triton" else ""))


def _rows(n, c, segments, *, dtype=torch.float32, seed=0, order="sorted", offset=0.0):
    """features [N, C], segment ids [N] (sorted, shuffled, or None = one segment)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    if order is None:
        return x, None
    seg = torch.sort(torch.randint(0, segments, (n,), generator=g))[0]
    if order == "shuffled":
        seg = seg[torch.randperm(n, generator=g)]
    return x, seg


# (N, C, S): one row, a prime C, one segment, many segments, empty segments (ids drawn from 0..S-1
# leave some out at these sizes), C = 0 and N = 0.
PRIM_SHAPES = [(1, 1, 1), (37, 7, 1), (50, 13, 3), (300, 3, 40), (9, 5, 12), (6, 0, 2), (0, 4, 3)]
# the interpreted Triton runs see fewer shapes: it is ~100x slower than the compiled kernels
PRIM_CASES = [pytest.param(b.values[0], *shape, marks=b.marks, id=f"{b.id}-{'x'.join(map(str, shape))}")
              for b in KERNEL_BACKENDS
              for shape in (PRIM_SHAPES if b.id == "cpu" else PRIM_SHAPES[:3] + PRIM_SHAPES[4:])]


@pytest.mark.parametrize("order", ["sorted", "shuffled", None])
@pytest.mark.parametrize("backend,n,c,s", PRIM_CASES)
def test_primitives_match_fp64_reference(backend, order, n, c, s):
    x, seg = _rows(n, c, s, order=order)
    s = 1 if seg is None else s
    count, mean, m2 = _op("moments", backend)(x, seg, s)
    rc, rm, rq = ref.segment_moments(x.double(), seg, s)
    assert_close_verbose(count, rc, atol=0, rtol=0, name="count")
    assert_close_verbose(mean, rm, atol=1e-5, rtol=1e-5, name="mean")
    assert_close_verbose(m2, rq, atol=1e-4, rtol=1e-5, name="m2")
    assert mean.dtype == torch.float32 and count.shape == (s,) and mean.shape == (s, c)
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(s, c, generator=g) for _ in range(4)]
    dy = torch.randn(n, c, generator=g)
    a, b = _op("grad_moments", backend)(dy, x, seg, tables[0])
    ra, rb = ref.segment_grad_moments(dy.double(), x.double(), seg, tables[0].double())
    assert_close_verbose(a, ra, atol=1e-4, rtol=1e-5, name="sum dy")
    assert_close_verbose(b, rb, atol=1e-4, rtol=1e-5, name="sum dy xc")
    y = _op("scale_shift", backend)(x, seg, *tables[:3])
    assert_close_verbose(y, ref.segment_scale_shift(x, seg, *tables[:3]), atol=1e-5, rtol=1e-5, name="y")
    dx = _op("norm_backward", backend)(dy, x, seg, *tables)
    assert_close_verbose(dx, ref.segment_norm_backward(dy, x, seg, *tables), atol=1e-5, rtol=1e-5, name="dx")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_reductions_are_deterministic_and_order_free(backend):
    """Bitwise equal on repeated runs (and thread counts); a shuffled row order gives the same statistics
    (to rounding)."""
    x, seg = _rows(2000, 9, 3, seed=4)
    first = _op("moments", backend)(x, seg, 3)
    again = _op("moments", backend)(x, seg, 3)
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    if backend == "cpu":  # the chunking does not depend on the thread count
        threads = torch.get_num_threads()
        torch.set_num_threads(2 if threads == 1 else 1)
        try:
            other = _op("moments", backend)(x, seg, 3)
        finally:
            torch.set_num_threads(threads)
        for u, v in zip(first, other):
            assert torch.equal(u, v)
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(1))
    shuffled = _op("moments", backend)(x[perm], seg[perm], 3)
    for u, v, name in zip(first, shuffled, ("count", "mean", "m2")):
        assert_close_verbose(v, u, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_mean_keeps_variance(backend):
    """A mean of 1e4 over noise of std 2: sum(x^2) - n mean^2 in fp32 would lose the variance."""
    x, seg = _rows(4000, 3, 2, offset=1e4)
    _, _, m2 = _op("moments", backend)(x, seg, 2)
    _, _, rq = ref.segment_moments(x.double(), seg, 2)
    assert_close_verbose(m2, rq, atol=0, rtol=1e-3, name="m2 at mean 1e4")


def test_compiled_kernel_checks():
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing segment_moments)")
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"segment_moments: segment ids must be in \[0, 2\), got 2 at row 3"):
        torch.ops.tcm.segment_moments(x, torch.tensor([0, 0, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"segment_moments: segment must be \[N\] = \[4\]"):
        torch.ops.tcm.segment_moments(x, torch.tensor([0, 0, 1]), 2)
    with pytest.raises(TypeError, match="segment_moments: segment must be int64"):
        torch.ops.tcm.segment_moments(x, torch.tensor([0, 0, 1, 1], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"segment_scale_shift: scale must be \[S, C\] = \[2, 3\]"):
        p = torch.zeros(2, 3)
        torch.ops.tcm.segment_scale_shift(x, torch.tensor([0, 0, 1, 1]), p, torch.zeros(2, 4), p)
    with pytest.raises(ValueError, match=r"segment_norm_backward: segment ids must be in \[0, 2\), got -1"):
        p = torch.zeros(2, 3)
        torch.ops.tcm.segment_norm_backward(x, x, torch.tensor([0, -1, 1, 1]), p, p, p, p)


# ---------------------------------------------------------------------------------------------- compact norms

def _compact_fns(backend):
    return {
        "batch": lambda x, seg, b, w, bias: FC.compact_batch_norm(x, None, None, w, bias, True, backend=backend),
        "instance": lambda x, seg, b, w, bias: FC.compact_instance_norm(x, seg, b, w, bias, backend=backend),
        "group": lambda x, seg, b, w, bias: FC.compact_group_norm(x, seg, b, 1 if x.shape[1] % 2 else 2, w, bias,
                                                                  backend=backend),
    }


def _out_and_grads(fn, x, seg, b, w, bias):
    x, w, bias = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    y = fn(x, seg, b, w, bias)
    grads = torch.autograd.grad((y.double() * loss_weights(y.shape).double()).sum(), (x, w, bias))
    return (y, *grads)


COMPACT_SHAPES = [(1, 1, 1), (40, 7, 3), (120, 6, 5)]
COMPACT_CASES = [pytest.param(b.values[0], *shape, order, marks=b.marks,
                              id=f"{b.id}-{'x'.join(map(str, shape))}-{order}")
                 for b in KERNEL_BACKENDS for shape in (COMPACT_SHAPES if b.id == "cpu" else COMPACT_SHAPES[:2])
                 for order in (("sorted", "shuffled") if b.id == "cpu" else ("shuffled",))]


@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,n,c,s,order", COMPACT_CASES)
def test_compact_norms_match_reference(backend, kind, dtype, n, c, s, order):
    x, seg = _rows(n, c, s, dtype=dtype, order=order)
    g = torch.Generator().manual_seed(2)
    w, bias = (torch.rand(c, generator=g) + 0.5).to(dtype), torch.randn(c, generator=g).to(dtype)
    got = _out_and_grads(_compact_fns(backend)[kind], x, seg, s, w, bias)
    want = _out_and_grads(_compact_fns("reference")[kind], x, seg, s, w, bias)
    atol, rtol = TOL[dtype]
    for a, b, name in zip(got, want, ("y", "dx", "dw", "db")):
        assert a.dtype == b.dtype, name
        assert_close_verbose(a, b, atol=atol * 10 if name in ("dw", "db") else atol, rtol=rtol, name=name)


@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_gradcheck_fp64_reference_and_engine(kind):
    backends = ["reference"] + (["cpu"] if tcm_kernels._backend.compiled_available(OP) else [])
    x, seg = _rows(11, 6, 4, dtype=torch.float64, order="shuffled", seed=6)
    seg[seg == 3] = 2  # sample 3 has no rows
    g = torch.Generator().manual_seed(6)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    for backend in backends:
        fn = _compact_fns(backend)[kind]
        assert torch.autograd.gradcheck(lambda f, w, b: fn(f, seg, 4, w, b), (x.requires_grad_(), w, b)), backend


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["instance", "group"])
def test_sample_without_rows(backend, kind):
    """Segment 1 has no row: the others are normalized as if it did not exist, nothing is NaN."""
    x, _ = _rows(30, 4, 1)
    seg = torch.tensor([0] * 12 + [2] * 18)
    w, b = torch.ones(4), torch.zeros(4)
    y, dx, dw, db = _out_and_grads(_compact_fns(backend)[kind], x, seg, 3, w, b)
    want = _out_and_grads(_compact_fns(backend)[kind], x, seg.clamp_max(1), 2, w, b)
    for a, e, name in zip((y, dx, dw, db), want, ("y", "dx", "dw", "db")):
        assert torch.isfinite(a).all(), name
        assert_close_verbose(a, e, atol=1e-6, rtol=1e-6, name=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    """Every row active, sorted by sample: compact instance / batch norm are torch's dense
    instance_norm on [B, C, L] / batch_norm on [N, C]; ours in ``dtype`` may err at most twice
    as much as torch's own in ``dtype``, both against the fp64 oracle."""
    b, c, length = 3, 8, 64
    x = torch.randn(b, c, length, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3 + 5
    rows = x.transpose(1, 2).reshape(b * length, c)
    seg = torch.arange(b).repeat_interleave(length)

    def dense_in(t):
        return torch.nn.functional.instance_norm(t, eps=1e-5).transpose(1, 2).reshape(b * length, c)

    cases = [(lambda r: FC.compact_instance_norm(r, seg, b, backend=backend), dense_in, x),
             (lambda r: FC.compact_batch_norm(r, backend=backend),
              lambda r: torch.batch_norm(r, None, None, None, None, True, 0.1, 1e-5, False), rows)]
    for ours, theirs, theirs_in in cases:
        oracle = ours(rows).double()
        err_ours = (ours(rows.to(dtype)).double() - oracle).abs().max().item()
        err_pt = (theirs(theirs_in.to(dtype)).double() - oracle).abs().max().item()
        assert err_ours <= 2 * err_pt, (err_ours, err_pt)


# ---------------------------------------------------------------------------------------------- opcheck, compile

def _op_samples(dtype, order):
    x, seg = _rows(23, 5, 3, dtype=dtype, order=order)
    s = 1 if seg is None else 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = [torch.randn(s, 5, dtype=acc) for _ in range(4)]
    dy = torch.randn_like(x)
    return {"moments": (x, seg, s), "scale_shift": (x, seg, *p[:3]), "grad_moments": (dy, x, seg, p[0]),
            "norm_backward": (dy, x, seg, *p)}


@pytest.mark.parametrize("order", ["shuffled", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", _PRIM)
def test_opcheck_compiled(name, dtype, order):
    if not tcm_kernels._backend.compiled_available(f"segment_{name}"):
        pytest.skip(f"compiled kernels not built (tcm_kernels._C missing segment_{name})")
    torch.library.opcheck(_op(name, "cpu"), _op_samples(dtype, order)[name])


@pytest.mark.parametrize("name", _PRIM)
def test_opcheck_triton(name):
    pytest.importorskip("triton")
    torch.library.opcheck(_op(name, "triton"), _op_samples(torch.float32, "shuffled")[name],
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    """Instance norm and batch norm on compact rows trace into one graph and agree with eager."""
    torch._dynamo.reset()
    x, seg = _rows(60, 4, 2)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)

    def block(f):
        h = FC.compact_instance_norm(f, seg, 2, w, b)
        return FC.compact_batch_norm(torch.relu(h), rm, rv, w, b, True)

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = block(xe)
    yc = torch.compile(block, fullgraph=True, backend="aot_eager")(xc)
    assert_close_verbose(yc, ye, atol=1e-5, rtol=1e-5, name="compiled y")
    (ye ** 2).sum().backward()
    (yc ** 2).sum().backward()
    assert_close_verbose(xc.grad, xe.grad, atol=1e-5, rtol=1e-5, name="compiled dx")


@pytest.mark.parametrize("kind,groups", [("batch", 1), ("instance", 5), ("group", 1)])
def test_engine_on_reference_primitives_matches_compiled(kind, groups):
    """The synchronised compact batch norm runs the engine over the reference primitives when the
    kernels are missing: same outputs and gradients as over the compiled ones."""
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing segment_moments)")
    from tcm_kernels.ops.sparse_norm_engine import normalize

    x, seg = _rows(40, 5, 3, order="shuffled", seed=7)
    seg, s = (None, 1) if kind == "batch" else (seg, 3)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    outs = []
    for backend in ("reference", "cpu"):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        y = normalize(xr, seg, s, wr, br, 1e-5, kind, groups, layout="rows", backend=backend)[0]
        outs.append((y, *torch.autograd.grad((y * loss_weights(y.shape)).sum(), (xr, wr, br))))
    for a, e, name in zip(*outs, ("y", "dx", "dw", "db")):
        assert_close_verbose(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("order", ["sorted", "shuffled", None])
def test_triton_reductions_in_many_parts(monkeypatch, order):
    """Big inputs cut each segment into several parts merged afterwards: forced here at a small size."""
    if not tcm_kernels._backend.triton_available():
        pytest.skip("triton not installed")
    from tcm_kernels.triton import sparse_norm as tsn

    monkeypatch.setattr(tsn, "_ROWS_PER_PART", 8)
    x, seg = _rows(70, 5, 2, order=order, offset=3.0)
    s = 1 if seg is None else 2
    assert tsn._parts(70, s) > 1
    _, mean, m2 = tsn.segment_moments(x, seg, s)
    _, rm, rq = ref.segment_moments(x.double(), seg, s)
    assert_close_verbose(mean, rm, atol=1e-5, rtol=1e-5, name="mean")
    assert_close_verbose(m2, rq, atol=1e-4, rtol=1e-5, name="m2")
    center = torch.randn(s, 5)
    a, b = tsn.segment_grad_moments(x, x, seg, center)
    ra, rb = ref.segment_grad_moments(x.double(), x.double(), seg, center.double())
    assert_close_verbose(a, ra, atol=1e-4, rtol=1e-5, name="sum dy")
    assert_close_verbose(b, rb, atol=1e-4, rtol=1e-5, name="sum dy xc")
