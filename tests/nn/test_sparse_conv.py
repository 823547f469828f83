"""SubMConv{2,3}d / SparseDownsample{2,3}d modules and the SparseTensor layout."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tcm_kernels
import tcm_kernels.nn as tnn
from tcm_kernels.reference import submconv as ref
from tcm_kernels.sparse_tensor import weight_from_spconv, weight_to_spconv
from tests.utils import assert_close_verbose

HAS_SPCONV = importlib.util.find_spec("spconv") is not None
needs_spconv = pytest.mark.skipif(not HAS_SPCONV, reason="spconv not installed (pip install spconv; extra 'bench')")


def case(nd, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = (8, 6) if nd == 2 else (4, 6, 4)
    x = torch.randn((2, c, *spatial), generator=g)
    mask = torch.rand((2, 1, *spatial), generator=g) < 0.5
    return x * mask, mask


@pytest.mark.parametrize("nd", [2, 3])
def test_sparse_tensor_round_trip(nd):
    x, mask = case(nd)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    assert st.features.shape == (int(mask.sum()), 4) and st.coords.dtype == torch.int32
    assert torch.equal(st.coords[:, 0], mask[:, 0].nonzero()[:, 0].int())
    xd, md = st.dense()
    assert torch.equal(md, mask) and torch.equal(xd, x)


@pytest.mark.parametrize("nd", [2, 3])
def test_modules_accept_both_layouts(nd):
    torch.manual_seed(0)
    x, mask = case(nd)
    conv = (tnn.SubMConv2d if nd == 2 else tnn.SubMConv3d)(4, 6, 3, groups=2)
    y = conv(x, mask)
    assert_close_verbose(y, ref.submanifold_conv(x, mask, conv.weight, conv.bias, groups=2), atol=1e-5, rtol=1e-5,
                         name="module")
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    ys = conv(st)
    assert isinstance(ys, tcm_kernels.SparseTensor)
    assert ys.coords is st.coords and ys.batch_size == 2 and ys.kernel_map() is st.kernel_map()
    assert_close_verbose(ys.dense()[0], y, atol=1e-5, rtol=1e-5, name="sparse layout")
    down = (tnn.SparseDownsample2d if nd == 2 else tnn.SparseDownsample3d)(4, 8, 2)
    yd, md = down(x, mask)
    yr, mr = ref.sparse_downsample(x, mask, down.weight, down.bias, stride=2)
    assert torch.equal(md, mr)
    assert_close_verbose(yd, yr, atol=1e-5, rtol=1e-5, name="downsample")
    sd = down(tcm_kernels.SparseTensor.from_dense(x, mask))
    assert torch.equal(sd.dense()[1], md)
    assert_close_verbose(sd.dense()[0], yd, atol=1e-5, rtol=1e-5, name="sparse downsample")
    assert "kernel_size=3" in repr(conv) and "stride=2" in repr(down)


@pytest.mark.parametrize("nd", [2, 3])
def test_sparse_tensor_path_equals_masked_dense_path(nd):
    """A conv -> relu -> downsample -> conv stack on shuffled SparseTensor rows equals the masked-dense stack,
    forward and parameter gradients; the SparseTensor path never densifies."""
    torch.manual_seed(1)
    x, mask = case(nd, c=4, seed=3)
    conv_cls, down_cls = (tnn.SubMConv2d, tnn.SparseDownsample2d) if nd == 2 else (tnn.SubMConv3d, tnn.SparseDownsample3d)
    convs = [conv_cls(4, 6, 3), conv_cls(8, 8, 3, groups=8)]
    down = down_cls(6, 8, 2)
    params = [p for m in (*convs, down) for p in m.parameters()]

    def dense_stack():
        y, m = down(torch.relu(convs[0](x, mask)), mask)
        return convs[1](y, m), m

    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    perm = torch.randperm(st.features.shape[0])
    st = tcm_kernels.SparseTensor(st.features[perm], st.coords[perm], st.spatial_shape, 2)
    h = convs[0](st)
    assert torch.equal(h.coords, st.coords), "a conv keeps the input's coords and row order"
    out = convs[1](down(h.replace_features(torch.relu(h.features))))
    y, m = dense_stack()
    dense_grads = torch.autograd.grad(y.square().sum(), params)
    yd, md = out.dense()
    assert torch.equal(md, m)
    assert_close_verbose(yd, y, atol=1e-5, rtol=1e-5, name="stack")
    for a, e in zip(torch.autograd.grad(out.features.square().sum(), params), dense_grads):
        assert_close_verbose(a, e, atol=1e-4, rtol=1e-4, name="param grad")


def test_module_errors():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        tnn.SubMConv2d(4, 4, 2)
    with pytest.raises(ValueError, match="divisible by groups=3"):
        tnn.SubMConv2d(4, 6, 3, groups=3)
    conv = tnn.SubMConv2d(4, 4, 3)
    x, mask = case(2)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        conv(x)
    with pytest.raises(ValueError, match="either a SparseTensor or"):
        conv(tcm_kernels.SparseTensor.from_dense(x, mask), mask)
    with pytest.raises(ValueError, match="coords must be \\[N=3, 3\\]"):
        tcm_kernels.SparseTensor(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.int32), (4, 4), 1)


def test_spconv_weight_layout():
    w = torch.randn(5, 3, 3, 1, 7)
    assert weight_to_spconv(w).shape == (5, 3, 1, 7, 3)
    assert torch.equal(weight_from_spconv(weight_to_spconv(w)), w)
    assert torch.equal(weight_to_spconv(w)[:, 2, 0, 4, :], w[:, :, 2, 0, 4])


@needs_spconv
@pytest.mark.parametrize("nd", [2, 3])
def test_spconv_round_trip(nd):
    x, mask = case(nd)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    sp = st.to_spconv()
    assert torch.equal(sp.indices, st.coords) and torch.equal(sp.features, st.features)
    assert list(sp.spatial_shape) == list(x.shape[2:]) and sp.batch_size == 2
    back = tcm_kernels.SparseTensor.from_spconv(sp)
    assert torch.equal(back.dense()[0], x) and torch.equal(back.dense()[1], mask)
    assert torch.equal(sp.dense(), x)  # spconv's own densify agrees with ours


@needs_spconv
@pytest.mark.gpu
def test_spconv_numerics_on_gpu():
    """spconv's CPU SubMConv is wrong (see docs/submconv.md), so its numbers are compared on a GPU only."""
    import spconv.pytorch as spconv

    x, mask = case(3, c=8)
    conv = spconv.SubMConv3d(8, 8, 3, bias=False, indice_key="k").cuda()
    st = tcm_kernels.SparseTensor.from_dense(x.cuda(), mask.cuda())
    out = conv(st.to_spconv()).dense()
    expected = ref.submanifold_conv(x.cuda(), mask.cuda(), weight_from_spconv(conv.weight.detach()))
    assert_close_verbose(out, expected, atol=1e-4, rtol=1e-4, name="spconv gpu")


@pytest.mark.parametrize("nd", [2, 3])
def test_coarsen_gives_the_coarse_mask_sites_and_their_map(nd):
    x, mask = case(nd)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    coarse, inverse = st.coarsen(2)
    pool = torch.nn.functional.max_pool2d if nd == 2 else torch.nn.functional.max_pool3d
    expected = pool(mask.float(), 2) > 0
    assert torch.equal(coarse.coords, expected[:, 0].nonzero().int())  # sorted (batch, *spatial)
    assert coarse.features.shape == (coarse.coords.shape[0], 0) and coarse.spatial_shape == expected.shape[2:]
    assert torch.equal(coarse.coords[inverse, 1:], st.coords[:, 1:] // 2)  # each row's parent
    assert torch.equal(coarse.coords[inverse, 0], st.coords[:, 0])
    attached = coarse.kernel_map()
    rebuilt = tcm_kernels.KernelMap.from_coords(coarse.coords, coarse.spatial_shape, coarse.batch_size)
    assert torch.equal(attached.grid, rebuilt.grid) and torch.equal(attached.sites, rebuilt.sites)


def test_3d_encoder_builds_one_kernel_map_per_stage(monkeypatch):
    """Every conv of a stage reuses the stage's map: one map from the stem's rows, one per downsample."""
    from tcm_mim.models import build_encoder

    built = []
    for name in ("from_coords", "from_sites"):
        original = getattr(tcm_kernels.KernelMap, name).__func__
        monkeypatch.setattr(tcm_kernels.KernelMap, name,
                            classmethod(lambda cls, *a, _f=original, _n=name, **k: built.append(_n) or _f(cls, *a, **k)))
    enc = build_encoder("resnet3d_tiny", dim=3, in_channels=1)
    patch = enc.downsample_ratio
    mask = tcm_kernels.upsample_mask(torch.rand(1, 1, 2, 2, 2) < 0.6, patch)
    mask[0, 0, 0, 0, 0] = True
    assert enc.runs_compact()
    feats = enc(torch.randn(1, 1, *mask.shape[2:]) * mask, mask)
    n_stages = len(feats)
    # from_coords validates (a host sync) and runs once, for the stem's rows; each later stage's map comes
    # from its downsample's unique sites (from_sites, no validation).
    assert built.count("from_coords") == 1, built
    assert built.count("from_sites") == n_stages - 1 + 1, built  # + the one inside from_coords
