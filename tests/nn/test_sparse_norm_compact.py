"""Sparse norm modules on the compact layout (SparseTensor) against the masked-dense path.

The masked-dense modules are tested against independent oracles in
tests/ops/test_sparse_norm.py; here the same module run on ``SparseTensor.from_dense``
of the same input must give the same output rows, input/weight/bias gradients and
running statistics.
"""

from __future__ import annotations

import pytest
import torch

from tcm_kernels import SparseTensor
from tcm_kernels.nn import (SparseBatchNorm2d, SparseBatchNorm3d, SparseGroupNorm, SparseInstanceNorm2d,
                            SparseInstanceNorm3d, SparseLayerNorm)
from tests.utils import assert_close_verbose, loss_weights, sync_batch_norm_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Both paths compute the statistics in float32 from the same (rounded) input, in different summation
# orders; fp16/bf16 outputs and gradients differ by the final rounding (one ulp of O(1) values).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
# Weight/bias gradients sum O(N) products: in fp32 the two summation orders differ by O(N eps).
GRAD_PARAM_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}

NORMS = {
    "batch2d": (2, lambda c: SparseBatchNorm2d(c)),
    "batch3d": (3, lambda c: SparseBatchNorm3d(c)),
    "instance2d": (2, lambda c: SparseInstanceNorm2d(c, affine=True)),
    "instance3d": (3, lambda c: SparseInstanceNorm3d(c, affine=True)),
    "group": (2, lambda c: SparseGroupNorm(2, c)),
    "layer": (3, lambda c: SparseLayerNorm(c, data_format="channels_first")),
}


def _inputs(dim, dtype, *, b=3, c=6, side=5, seed=0, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    shape = (b, c) + (side,) * dim
    mask = torch.rand((b, 1) + (side,) * dim, generator=g) < keep
    mask.view(b, -1)[:, 0] = True
    x = ((torch.randn(shape, generator=g) * 2 + 1) * mask).to(dtype)
    return x, mask


def _randomize_affine(module, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p is module.weight else torch.randn(p.shape, generator=g))


def _active_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] -> [N, C] at the active sites, in SparseTensor.from_dense's row order."""
    return t.movedim(1, -1)[mask[:, 0]]


def _run_both(module_fn, x, mask, *, seed=1):
    """(masked-dense, compact) module outputs, gradients and modules for one input."""
    dense_mod, compact_mod = module_fn(), module_fn()
    compact_mod.load_state_dict(dense_mod.state_dict())
    st = SparseTensor.from_dense(x, mask)
    go = torch.randn(st.features.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)

    xd = x.detach().clone().requires_grad_()
    yd = dense_mod(xd, mask)
    (_active_rows(yd, mask).float() * go.float()).sum().backward()

    feats = st.features.detach().clone().requires_grad_()
    out = compact_mod(st.replace_features(feats))
    assert isinstance(out, SparseTensor) and out.coords is st.coords and out.batch_size == st.batch_size
    (out.features.float() * go.float()).sum().backward()
    return (yd, xd.grad, dense_mod), (out.features, feats.grad, compact_mod)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(NORMS))
def test_compact_equals_masked_dense(kind, dtype):
    dim, make = NORMS[kind]
    x, mask = _inputs(dim, dtype)

    def module_fn():
        m = make(x.shape[1])
        _randomize_affine(m)
        return m

    (yd, gd, md), (yc, gc, mc) = _run_both(module_fn, x, mask)
    atol, rtol = TOL[dtype]
    assert yc.dtype == dtype and gc.dtype == dtype
    assert_close_verbose(yc, _active_rows(yd, mask), atol=atol, rtol=rtol, name=f"{kind} y")
    assert_close_verbose(gc, _active_rows(gd, mask), atol=atol, rtol=rtol, name=f"{kind} dx")
    assert (_active_rows(gd, mask).numel() == gc.numel()) and gd.movedim(1, -1)[~mask[:, 0]].abs().sum() == 0
    patol, prtol = GRAD_PARAM_TOL[dtype]
    for name in ("weight", "bias"):
        assert_close_verbose(getattr(mc, name).grad, getattr(md, name).grad, atol=patol, rtol=prtol,
                             name=f"{kind} d{name}")
    if kind.startswith("batch"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close_verbose(getattr(mc, buf), getattr(md, buf), atol=1e-6, rtol=1e-6, name=f"{kind} {buf}")


@pytest.mark.parametrize("momentum", [0.3, None])
def test_batch_norm_running_stats_over_steps_and_eval(momentum):
    x, mask = _inputs(2, torch.float32, seed=4)
    dense, compact = SparseBatchNorm2d(6, momentum=momentum), SparseBatchNorm2d(6, momentum=momentum)
    st = SparseTensor.from_dense(x, mask)
    for step in range(3):  # cumulative average (momentum=None) needs several steps to be checked
        dense(x * (step + 1), mask)
        compact(st.replace_features(st.features * (step + 1)))
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close_verbose(getattr(compact, buf), getattr(dense, buf), atol=1e-6, rtol=1e-6, name=buf)
    dense.eval(), compact.eval()
    assert_close_verbose(compact(st).features, _active_rows(dense(x, mask), mask), atol=2e-5, rtol=2e-5, name="eval")


def test_batch_norm_single_row_gives_zero_unbiased_variance():
    """One active site: the masked-dense op's running variance takes 0 (the native op would give NaN)."""
    x = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[1, 0, 2, 3] = True
    x[1, :, 2, 3] = torch.tensor([1.0, -2.0, 3.0])
    dense, compact = SparseBatchNorm2d(3), SparseBatchNorm2d(3)
    yd = dense(x, mask)
    yc = compact(SparseTensor.from_dense(x, mask))
    assert torch.isfinite(compact.running_var).all()
    for buf in ("running_mean", "running_var"):
        assert_close_verbose(getattr(compact, buf), getattr(dense, buf), atol=1e-7, rtol=1e-7, name=buf)
    # x - mean is 0 in exact math; torch.batch_norm's mean is off by an ulp of x (3 -> ~2e-7), which the
    # rstd of a zero variance, 1 / sqrt(eps) ~ 316, amplifies to ~1e-4.
    assert_close_verbose(yc.features, _active_rows(yd, mask), atol=2e-4, rtol=0, name="y")


def test_float64_features_with_float32_parameters():
    """torch.batch_norm rejects mixed float64/float32; the compact path computes in the features' dtype."""
    x, mask = _inputs(2, torch.float64)
    (yd, gd, md), (yc, gc, mc) = _run_both(lambda: SparseBatchNorm2d(6), x, mask)
    assert yc.dtype == torch.float64
    assert_close_verbose(yc, _active_rows(yd, mask), atol=1e-10, rtol=1e-10, name="y")
    assert_close_verbose(gc, _active_rows(gd, mask), atol=1e-10, rtol=1e-10, name="dx")
    assert_close_verbose(mc.running_var, md.running_var, atol=1e-7, rtol=1e-7, name="running_var")


@pytest.mark.parametrize("kind", ["batch2d", "instance2d", "group", "layer"])
def test_empty_image_in_batch(kind):
    dim, make = NORMS[kind]
    x, mask = _inputs(dim, torch.float32, b=3)
    mask[1] = False
    x = x * mask

    def module_fn():
        m = make(x.shape[1])
        _randomize_affine(m)
        return m

    (yd, gd, md), (yc, gc, mc) = _run_both(module_fn, x, mask)
    assert_close_verbose(yc, _active_rows(yd, mask), atol=2e-5, rtol=2e-5, name="y")
    assert_close_verbose(gc, _active_rows(gd, mask), atol=2e-5, rtol=2e-5, name="dx")
    assert torch.isfinite(yc).all() and torch.isfinite(gc).all()
    assert_close_verbose(mc.weight.grad, md.weight.grad, atol=1e-4, rtol=1e-4, name="dweight")


@pytest.mark.parametrize("kind", ["instance2d", "instance3d", "group"])
def test_per_sample_norms_do_not_need_sorted_rows(kind):
    dim, make = NORMS[kind]
    x, mask = _inputs(dim, torch.float32, b=3)
    module = make(x.shape[1])
    _randomize_affine(module)
    st = SparseTensor.from_dense(x, mask)
    perm = torch.randperm(st.features.shape[0], generator=torch.Generator().manual_seed(5))
    shuffled = SparseTensor(st.features[perm], st.coords[perm], st.spatial_shape, st.batch_size)
    assert_close_verbose(module(shuffled).features, module(st).features[perm], atol=1e-6, rtol=1e-6, name="y")


def test_batch_norm_no_active_site():
    bn = SparseBatchNorm2d(4)
    empty = SparseTensor(torch.zeros(0, 4), torch.zeros(0, 3, dtype=torch.int32), (5, 5), 2)
    with pytest.raises(RuntimeError, match="no active site"):
        bn(empty)
    bn.eval()  # running statistics: nothing to normalize, nothing undefined
    assert bn(empty).features.shape == (0, 4)
    assert SparseInstanceNorm2d(4)(empty).features.shape == (0, 4)


def test_errors():
    x, mask = _inputs(2, torch.float32)
    st = SparseTensor.from_dense(x, mask)
    with pytest.raises(ValueError, match="either a SparseTensor or"):
        SparseBatchNorm2d(6)(st, mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        SparseInstanceNorm2d(6)(x)
    with pytest.raises(ValueError, match="must have 4 channels"):
        SparseGroupNorm(2, 4)(st)
    with pytest.raises(ValueError, match="SparseBatchNorm3d: x must be a SparseTensor with 3 spatial dims, got 2"):
        SparseBatchNorm3d(6)(st)
    with pytest.raises(ValueError, match="SparseInstanceNorm3d: x must be a SparseTensor with 3 spatial dims"):
        SparseInstanceNorm3d(6)(st)


# ---------------------------------------------------------------------------------------------- sync batch norm

def test_sync_batch_norm_two_ranks_equals_one_big_batch():
    x, mask = _inputs(2, torch.float32, b=4, c=3)
    st = SparseTensor.from_dense(x, mask)
    split = 7  # uneven ranks: 7 rows on rank 0, the rest on rank 1
    g = torch.Generator().manual_seed(8)
    w, b = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    ranks = [slice(0, split), slice(split, None)]
    parts = sync_batch_norm_ranks([SparseTensor(st.features[r], st.coords[r], st.spatial_shape, st.batch_size)
                                   for r in ranks], w, b)
    full = SparseBatchNorm2d(3)
    with torch.no_grad():
        full.weight.copy_(w)
        full.bias.copy_(b)
    xr = x.clone().requires_grad_()
    y = _active_rows(full(xr, mask), mask)
    weights = [loss_weights((n, 3)) for n in (split, st.features.shape[0] - split)]
    (y * torch.cat(weights)).sum().backward()  # the ranks' losses
    assert_close_verbose(torch.cat([p["y"] for p in parts]), y, atol=1e-5, rtol=1e-5, name="sync y")
    assert_close_verbose(torch.cat([p["dx"] for p in parts]), _active_rows(xr.grad, mask), atol=1e-5, rtol=1e-5,
                         name="sync dx")
    assert_close_verbose(parts[0]["dw"] + parts[1]["dw"], full.weight.grad, atol=1e-4, rtol=1e-4, name="sync dw")
    for p in parts:
        assert_close_verbose(p["rv"], full.running_var, atol=1e-6, rtol=1e-6, name="sync running_var")


@pytest.mark.parametrize("groups", [1, 2, 6])  # group norm, and instance norm (6 groups of 1 channel)
def test_segment_norm_gradcheck_float64(groups):
    from tcm_kernels.ops.sparse_norm_compact import compact_group_norm

    g = torch.Generator().manual_seed(6)
    feats = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    batch_index = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1])  # unsorted rows; sample 3 has none
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w, b: compact_group_norm(f, batch_index, 4, groups, w, b),
                                    (feats, w, b))
