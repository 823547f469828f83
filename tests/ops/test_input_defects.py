"""Op-level input defects found by probing (issue 14 item 7): each gets a named error or agreeing back ends."""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels.nn import SparseBatchNorm2d, SparseDownsample2d, SparseGroupNorm, SparseLayerNorm, SubMConv2d
from tests.utils import assert_close_verbose, backend_param

CONV_BACKENDS = [backend_param("submconv_forward", "reference"), backend_param("submconv_forward", "cpu")]
NORM_BACKENDS = [backend_param("masked_moments", "reference"), backend_param("masked_moments", "cpu")]


def _case(cin=4, cout=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 7, 6, generator=g)
    mask = torch.rand(2, 1, 7, 6, generator=g) < 0.5
    w = torch.randn(cout, cin, 3, 3, generator=g) / 4
    return x, mask, w


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_dilation_beyond_int32_is_rejected(backend):
    """The kernels hold dilation in int32: 2**32 + 1 used to run as dilation 1."""
    x, mask, w = _case()
    with pytest.raises(ValueError, match="dilation must be a positive int or 2 positive ints, each < 2\\^31"):
        tcm_kernels.submanifold_conv(x, mask, w, dilation=2**32 + 1, backend=backend)
    st = tcm_kernels.SparseTensor.from_dense(x, mask)
    with pytest.raises(ValueError, match="submanifold_conv_compact: dilation must be"):
        tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), w, dilation=(1, 2**31), backend=backend)


def test_nan_at_inactive_sites_is_ignored_by_every_back_end():
    """Values at inactive sites are never read: NaN there gives the same finite output on every back end."""
    x, mask, w = _case()
    poisoned = torch.where(mask, x, float("nan"))
    want = tcm_kernels.submanifold_conv(x, mask, w, backend="reference")
    for backend in ("reference", "cpu"):
        y = tcm_kernels.submanifold_conv(poisoned, mask, w, backend=backend)
        assert bool(torch.isfinite(y).all()), backend
        assert_close_verbose(y, want, atol=1e-5, rtol=1e-5, name=f"conv {backend}")
        y, _ = tcm_kernels.sparse_downsample(poisoned[..., :6, :6], mask[..., :6, :6], torch.randn(5, 4, 2, 2),
                                             stride=2, backend=backend)
        assert bool(torch.isfinite(y).all()), backend
    norm_want = tcm_kernels.sparse_batch_norm(x, mask, backend="reference")
    for backend in ("reference", "cpu"):
        y = tcm_kernels.sparse_batch_norm(poisoned, mask, backend=backend)
        assert_close_verbose(y, norm_want, atol=1e-5, rtol=1e-5, name=f"batch norm {backend}")
        assert bool(torch.isfinite(tcm_kernels.sparse_group_norm(poisoned, mask, 2, backend=backend)).all())


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_zero_input_channels_is_one_error_on_every_back_end(backend):
    x, mask, _ = _case()
    with pytest.raises(ValueError, match="submanifold_conv: input channels must be >= 1, got Cin=0"):
        tcm_kernels.submanifold_conv(x[:, :0], mask, torch.randn(6, 0, 3, 3), backend=backend)


@pytest.mark.parametrize("make, match", [
    (lambda: SubMConv2d(0, 4, 3), "SubMConv2d: in_channels must be a positive int, got 0"),
    (lambda: SubMConv2d(4, 0, 3), "SubMConv2d: out_channels must be a positive int, got 0"),
    (lambda: SubMConv2d(4, 4, 3, groups=0), "SubMConv2d: groups must be a positive int, got 0"),
    (lambda: SubMConv2d(4, 4, 3, dilation=0), "SubMConv2d: dilation must be a positive int"),
    (lambda: SubMConv2d(4, 4, 3, dilation=2**31), "SubMConv2d: dilation must be a positive int"),
    (lambda: SparseDownsample2d(4, 4, 0), "SparseDownsample2d: stride must be a positive int, got 0"),
    (lambda: SparseGroupNorm(0, 4), "SparseGroupNorm: num_groups must be a positive int, got 0"),
])
def test_modules_reject_bad_arguments_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("chunk_rows", [-1, 2**40, 1.5])
def test_chunk_rows_is_bounded(chunk_rows):
    x, mask, w = _case()
    with pytest.raises(ValueError, match="submanifold_conv: chunk_rows must be an int in \\[0, 1048576\\]"):
        tcm_kernels.submanifold_conv(x, mask, w, chunk_rows=chunk_rows)


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_norm_eps_must_be_positive_and_finite(backend, eps):
    x, mask, _ = _case()
    with pytest.raises(ValueError, match="sparse_batch_norm: eps must be in \\(0.0, inf\\)"):
        tcm_kernels.sparse_batch_norm(x, mask, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="sparse_group_norm: eps must be"):
        tcm_kernels.sparse_group_norm(x, mask, 2, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="SparseBatchNorm2d: eps must be"):
        SparseBatchNorm2d(4, eps=eps)
    with pytest.raises(ValueError, match="SparseLayerNorm: eps must be"):
        SparseLayerNorm(4, eps=eps)


@pytest.mark.parametrize("momentum", [2.0, -0.1, float("nan")])
def test_batch_norm_momentum_in_unit_interval(momentum):
    x, mask, _ = _case()
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="sparse_batch_norm: momentum must be in \\[0.0, 1.0\\]"):
        tcm_kernels.sparse_batch_norm(x, mask, rm, rv, momentum=momentum)
    with pytest.raises(ValueError, match="SparseBatchNorm2d: momentum must be in"):
        SparseBatchNorm2d(4, momentum=momentum)
    SparseBatchNorm2d(4, momentum=None)  # None keeps nn.BatchNorm's cumulative average


def test_recon_loss_norm_pix_must_be_bool_and_eps_positive():
    pred, target = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 8, 8)  # constant patches: variance 0
    visible = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="masked_recon_loss: norm_pix must be a bool, got str 'no'"):
        tcm_kernels.masked_recon_loss(pred, target, visible, 4, norm_pix="no")
    with pytest.raises(ValueError, match="masked_recon_loss: eps must be in \\(0.0, inf\\)"):
        tcm_kernels.masked_recon_loss(pred, target, visible, 4, eps=0.0)
    loss, _ = tcm_kernels.masked_recon_loss(pred, target, visible, 4, norm_pix=False, eps=0.0)  # eps unused
    assert bool(torch.isfinite(loss))


@pytest.mark.parametrize("strategy", ["uniform", "weighted", "hardest"])
def test_sample_mask_on_the_meta_device(strategy):
    """Shape inference with meta tensors (the data-dependent score checks need data; they are skipped)."""
    out = tcm_kernels.sample_mask(torch.empty(3, 16, device="meta"), 0.25, strategy=strategy, seed=1)
    assert out.visible.device.type == "meta"
    assert tuple(out.visible.shape) == (3, 16) and tuple(out.ids_keep.shape) == (3, 12)
