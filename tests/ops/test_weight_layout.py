"""The compiled conv engine's weight-layout cache (tcm_kernels/ops/weight_layout.py).

The cached path must give the same bits as the uncached one (forward, input and weight gradients),
see every in-place update of the weight, let the gradient reach the parameter, hold one entry per
live weight, and stay out of torch.compile tracing, fake tensors and inference mode.
"""

from __future__ import annotations

import gc

import pytest
import torch

import tcm_kernels
from tcm_kernels._core.geometry import transposed_kernel
from tcm_kernels.ops import weight_layout as wl
from tcm_kernels.ops._submconv_ops import conv_op
from tests.utils import backend_param

pytestmark = pytest.mark.parametrize("backend", [backend_param("submconv_compact_forward", "cpu")])


@pytest.fixture(autouse=True)
def empty_cache():
    wl.clear_weight_cache()
    yield
    wl.clear_weight_cache()


def _case(nd=3, cin=8, cout=12, k=3, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = (5, 6, 7) if nd == 3 else (9, 11)
    mask = torch.rand((2, 1, *spatial), generator=g) < 0.5
    x = torch.randn((2, cin, *spatial), generator=g) * mask
    w = torch.randn((cout, cin // groups, *(k,) * nd), generator=g) / (cin * k**nd) ** 0.5
    return x, mask, w


def _uncached_compact(st, w, groups):
    """The op without the cache: the engine re-lays out the weight on every call (the former behaviour)."""
    f = st.features.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    km = st.kernel_map()
    y = conv_op("compact", "cpu")(f, km.grid, km.sites, w, None, [1] * st.ndim, groups, 0)
    y.square().sum().backward()
    return y, f.grad, w.grad


@pytest.mark.parametrize("nd, groups", [(3, 1), (3, 2), (2, 1)])
def test_cached_kernels_equal_the_weight_and_its_transpose(backend, nd, groups):
    _, _, w = _case(nd=nd, groups=groups)
    w = torch.nn.Parameter(w)
    view = wl.cached_weight(w, groups)
    assert view is not w and torch.equal(view, w)
    entry = wl._ENTRIES[id(w)]
    assert view.untyped_storage().data_ptr() == entry.gemm.untyped_storage().data_ptr()  # no copy of its own
    with torch.no_grad():  # as in a backward pass (create_graph=False)
        assert torch.equal(wl.transposed_kernel(view, groups), transposed_kernel(w, groups))
        assert entry.transposed is not None and entry.transposed.is_contiguous()
        assert torch.equal(wl.transposed_kernel(w, groups), transposed_kernel(w, groups))  # not handed out: computed


@pytest.mark.parametrize("groups", [1, 2])
def test_cached_compact_equals_uncached_bit_for_bit(backend, groups):
    x, mask, w0 = _case(groups=groups)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    y_ref, gf_ref, gw_ref = _uncached_compact(st, w0, groups)
    w = torch.nn.Parameter(w0.clone())
    for _ in range(2):  # the second call runs on the cached layouts
        w.grad = None
        f = st.features.detach().clone().requires_grad_()
        y = tcm_kernels.submanifold_conv_compact(f, st.kernel_map(), w, groups=groups)
        y.square().sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(f.grad, gf_ref) and torch.equal(w.grad, gw_ref)
    entry = wl._ENTRIES[id(w)]
    assert entry.transposed is not None, "the backward did not use the cached transposed kernel"


def test_cached_masked_dense_equals_uncached_bit_for_bit(backend):
    x, mask, w0 = _case()
    outs = []
    for cached in (False, True):
        xi = x.clone().requires_grad_()
        w = torch.nn.Parameter(w0.clone())
        if cached:
            y = tcm_kernels.submanifold_conv(xi, mask, w)
        else:
            y = conv_op("dense", "cpu")(xi, mask, w, None, [1, 1, 1], 1, 0)
        y.square().sum().backward()
        outs.append((y, xi.grad, w.grad))
    assert len(wl._ENTRIES) == 1
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_in_place_updates_invalidate_the_cache(backend):
    x, mask, w0 = _case()
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    conv = tcm_kernels.nn.SubMConv3d(8, 12, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w0)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for update in ("optimizer", "no_grad add_", "load_state_dict"):
        y = conv(st).features
        y.square().sum().backward()
        if update == "optimizer":
            opt.step()
        elif update == "no_grad add_":
            with torch.no_grad():
                conv.weight.add_(1.0)
        else:
            conv.load_state_dict({"weight": torch.randn_like(conv.weight)})
        opt.zero_grad()
        y_ref, gf_ref, gw_ref = _uncached_compact(st, conv.weight, 1)
        f = st.features.clone().requires_grad_()
        y = conv(st.replace_features(f)).features
        y.square().sum().backward()
        assert torch.equal(y, y_ref), f"stale layout after {update}"
        assert torch.equal(f.grad, gf_ref) and torch.equal(conv.weight.grad, gw_ref), f"stale layout after {update}"
        opt.zero_grad()


def test_one_entry_per_weight_and_freed_with_it(backend):
    x, mask, w0 = _case()
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    w = torch.nn.Parameter(w0.clone())
    for _ in range(3):
        with torch.no_grad():
            w.mul_(0.5)  # a new version each call: the entry is replaced, not added
        tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), w).sum().backward()
    assert len(wl._ENTRIES) == 1
    del w
    gc.collect()
    assert len(wl._ENTRIES) == 0 and len(wl._VIEWS) == 0


def test_second_order_gradient_does_not_use_the_detached_cache(backend):
    """create_graph=True: the input gradient must stay differentiable w.r.t. the weight."""
    x, mask, w0 = _case()
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    grads = []
    for cached in (False, True):
        w = torch.nn.Parameter(w0.clone())
        f = st.features.clone().requires_grad_()
        km = st.kernel_map()
        if cached:
            y = tcm_kernels.submanifold_conv_compact(f, km, w)
        else:
            y = conv_op("compact", "cpu")(f, km.grid, km.sites, w, None, [1, 1, 1], 1, 0)
        (gf,) = torch.autograd.grad(y.square().sum(), f, create_graph=True)
        grads.append(torch.autograd.grad(gf.square().sum(), w)[0])
    assert torch.equal(grads[0], grads[1])


def test_not_cached_where_it_cannot_apply(backend):
    _, _, w = _case()
    with torch.inference_mode():
        assert wl.cached_weight(w, 1) is w
    assert wl.cached_weight(w.double(), 1).dtype == torch.float64
    w1 = torch.randn(4, 8, 1, 1, 1)
    assert wl.cached_weight(w1, 1) is w1  # a 1^d kernel is its own GEMM layout
    with torch._subclasses.FakeTensorMode():
        fake = torch.empty(4, 8, 3, 3, 3)
        assert wl.cached_weight(fake, 1) is fake
    assert len(wl._ENTRIES) == 0


def test_new_version_reuses_the_buffers_unless_a_graph_still_reads_them(backend):
    x, mask, w0 = _case()
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    w = torch.nn.Parameter(w0.clone())

    def step():
        f = st.features.clone().requires_grad_()
        y = tcm_kernels.submanifold_conv_compact(f, st.kernel_map(), w)
        y.square().sum().backward()
        return y.detach(), f.grad

    step()
    entry = wl._ENTRIES[id(w)]
    buffers = (entry.gemm.data_ptr(), entry.transposed.data_ptr())
    with torch.no_grad():
        w.mul_(-0.5)
    y, gf = step()  # the last graph is freed: laid out again in place, no allocation
    assert wl._ENTRIES[id(w)] is entry and (entry.gemm.data_ptr(), entry.transposed.data_ptr()) == buffers
    y_ref, gf_ref, _ = _uncached_compact(st, w, 1)
    assert torch.equal(y, y_ref) and torch.equal(gf, gf_ref)

    held = tcm_kernels.submanifold_conv_compact(st.features.clone().requires_grad_(), st.kernel_map(), w)
    old = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    step()  # `held`'s graph still reads the old layout: a new entry, the old buffers untouched
    assert wl._ENTRIES[id(w)] is not entry
    assert torch.equal(entry.gemm, old.reshape(1, 12, 8, 27).transpose(2, 3))
    held.sum().backward()  # still differentiable through the old version
