"""Sparse encoders and the SparK MIM model vs a dense emulation written here.

The emulation is what SparK and AnatoMask do today: dense conv on the masked input
with the mask re-applied after every layer, norms computed by gathering the active
sites. Every tcm_kernels layer of a model is swapped for its emulation (same
parameters), and features, loss and gradients must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tcm_kernels
import tcm_kernels.nn as tnn
from tcm_mim.models import SparKMIM, build_encoder, export_dense, set_backend


def _conv_fn(dim):
    return F.conv2d if dim == 2 else F.conv3d


class _EmuConv(nn.Module):
    def __init__(self, src):
        super().__init__()
        self.src = src

    def forward(self, x, mask):
        w = self.src.weight
        dim = w.dim() - 2
        dil = self.src.dilation if isinstance(self.src.dilation, tuple) else (self.src.dilation,) * dim
        pad = tuple(d * (k // 2) for d, k in zip(dil, w.shape[2:]))
        m = mask.to(x.dtype)
        return _conv_fn(dim)(x * m, w, self.src.bias, padding=pad, dilation=dil, groups=self.src.groups) * m


class _EmuDown(nn.Module):
    def __init__(self, src):
        super().__init__()
        self.src = src

    def forward(self, x, mask):
        w = self.src.weight
        dim, s = w.dim() - 2, w.shape[2]
        m = mask.to(x.dtype)
        pool = F.max_pool2d if dim == 2 else F.max_pool3d
        m2 = pool(m, s)
        return _conv_fn(dim)(x * m, w, self.src.bias, stride=s) * m2, m2 > 0


def _gather_stats(x, mask, dims_keep):
    """mean / biased var over active sites, grouped by dims_keep of x.movedim(1, -1)."""
    xs = x.movedim(1, -1)  # [B, *S, C]
    act = mask[:, 0]
    if dims_keep == "channel":
        v = xs[act]  # [n, C]
        return v.mean(0), v.var(0, unbiased=False)
    means, vars_ = [], []
    for b in range(x.shape[0]):  # per sample (instance norm)
        v = xs[b][act[b]]
        means.append(v.mean(0))
        vars_.append(v.var(0, unbiased=False))
    return torch.stack(means), torch.stack(vars_)


class _EmuNorm(nn.Module):
    def __init__(self, src):
        super().__init__()
        self.src = src

    def forward(self, x, mask):
        src, m = self.src, mask.to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if isinstance(src, tnn.SparseLayerNorm):
            y = F.layer_norm(x.movedim(1, -1), src.normalized_shape, src.weight, src.bias, src.eps).movedim(-1, 1)
            return y * m
        if isinstance(src, (tnn.SparseInstanceNorm2d, tnn.SparseInstanceNorm3d)):
            mean, var = _gather_stats(x, mask, "sample")
            ishape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
            y = (x - mean.view(ishape)) / torch.sqrt(var.view(ishape) + src.eps)
        else:  # batch norm, training statistics
            mean, var = _gather_stats(x, mask, "channel")
            y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + src.eps)
        if getattr(src, "weight", None) is not None:
            y = y * src.weight.view(shape) + src.bias.view(shape)
        return y * m


def emulated(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tcm_kernels layers are dense emulations sharing nothing."""
    emu = copy.deepcopy(model)

    def swap(mod):
        for name, child in mod.named_children():
            if isinstance(child, (tnn.SubMConv2d, tnn.SubMConv3d)):
                setattr(mod, name, _EmuConv(child))
            elif isinstance(child, (tnn.SparseDownsample2d, tnn.SparseDownsample3d)):
                setattr(mod, name, _EmuDown(child))
            elif isinstance(child, (tnn.SparseBatchNorm2d, tnn.SparseBatchNorm3d, tnn.SparseInstanceNorm2d,
                                    tnn.SparseInstanceNorm3d, tnn.SparseLayerNorm)):
                setattr(mod, name, _EmuNorm(child))
            else:
                swap(child)

    swap(emu)
    return emu


def _patch_mask(b, grid, ratio, seed=0):
    n = 1
    for g in grid:
        n *= g
    ms = tcm_kernels.sample_mask(torch.rand(b, n), ratio, strategy="uniform", seed=seed)
    return ms.visible


CASES = [
    ("resnet_tiny", 2, (64, 64), 3),
    ("convnext_tiny", 2, (64, 64), 1),
    ("resnet3d_tiny", 3, (16, 16, 16), 1),
]


@pytest.mark.parametrize("name,dim,size,cin", CASES)
def test_encoder_features_and_loss_match_dense_emulation(name, dim, size, cin):
    torch.manual_seed(0)
    enc = build_encoder(name, dim=dim, in_channels=cin)
    model = SparKMIM(enc, dim=dim, in_channels=cin, decoder_width=32)
    emu = emulated(model)
    image = torch.randn(2, cin, *size)
    grid = tuple(s // model.patch_size for s in size)
    visible = _patch_mask(2, grid, 0.5)

    out, ref = model(image, visible), emu(image, visible)
    torch.testing.assert_close(out.pred, ref.pred, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.per_patch, ref.per_patch, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    emu_params = dict(emu.named_parameters())
    for pname, p in model.named_parameters():
        q = emu_params[pname] if pname in emu_params else emu_params.get(_emu_name(pname))
        assert q is not None, pname
        torch.testing.assert_close(p.grad, q.grad, atol=5e-4, rtol=5e-3, msg=lambda m: f"{pname}: {m}")


def _emu_name(pname: str) -> str:
    """Parameter name inside an emulation wrapper: a.conv.weight -> a.conv.src.weight."""
    head, _, leaf = pname.rpartition(".")
    return f"{head}.src.{leaf}"


@pytest.mark.parametrize("name,dim,size,cin", CASES)
def test_dense_export_equals_sparse_on_all_visible(name, dim, size, cin):
    torch.manual_seed(1)
    enc = build_encoder(name, dim=dim, in_channels=cin).eval()
    for m in enc.modules():  # non-trivial running statistics for the batch norms
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    image = torch.randn(2, cin, *size)
    mask = torch.ones(2, 1, *size, dtype=torch.bool)
    sparse = [f for f, _ in enc(image, mask)]
    dense_model = export_dense(enc)
    assert not any(isinstance(m, (tnn.SubMConv2d, tnn.SubMConv3d)) for m in dense_model.modules())
    dense = dense_model(image)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_one_step_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = SparKMIM(build_encoder("resnet_tiny", in_channels=1), decoder_width=32)
    image = torch.randn(4, 1, 64, 64)
    visible = _patch_mask(4, (2, 2), 0.5, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(image, visible).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses


def test_bad_image_size():
    model = SparKMIM(build_encoder("resnet_tiny"), decoder_width=16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 1, 40, 40), torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize("name,dim,size,cin,norm", [
    ("resnet_tiny", 2, (64, 64), 3, "batch"),
    ("convnext_tiny", 2, (64, 64), 1, None),
    ("resnet3d_tiny", 3, (16, 16, 16), 1, "instance"),
    ("resnet3d_tiny", 3, (16, 16, 16), 1, "batch"),
])
def test_compact_layout_equals_masked_dense_layout(name, dim, size, cin, norm):
    """The encoder's compact path (default) and its masked-dense path (backend "reference") agree:
    per-stage features and masks, running statistics, and every parameter and input gradient."""
    torch.manual_seed(0)
    enc = build_encoder(name, dim=dim, in_channels=cin, **({} if norm is None else {"norm": norm}))
    ref = copy.deepcopy(enc)
    set_backend(ref, "reference")
    assert enc.runs_compact() and not ref.runs_compact()
    p = enc.downsample_ratio
    grid = tuple(s // p for s in size)
    visible = _patch_mask(2, grid, 0.5, seed=1)
    visible[1] = False  # an all-masked image in the batch
    visible[1, 0] = True
    mask = tcm_kernels.upsample_mask(visible.reshape(2, 1, *grid), p)
    image = torch.randn(2, cin, *size) * mask

    results = []
    for model in (enc, ref):
        x = image.clone().requires_grad_()
        feats = model(x, mask)
        weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i)) for i, (f, _) in enumerate(feats)]
        sum((f * w).sum() for (f, _), w in zip(feats, weights)).backward()
        results.append((feats, x.grad))
    (feats_c, dx_c), (feats_r, dx_r) = results
    for i, ((fc, mc), (fr, mr)) in enumerate(zip(feats_c, feats_r)):
        assert torch.equal(mc, mr), f"stage {i} mask"
        assert (fc[~mc.expand_as(fc)] == 0).all(), f"stage {i}: inactive sites must be 0"
        torch.testing.assert_close(fc, fr, atol=2e-4, rtol=2e-4, msg=lambda m, i=i: f"stage {i}: {m}")
    torch.testing.assert_close(dx_c, dx_r, atol=2e-4, rtol=2e-4)
    ref_params = dict(ref.named_parameters())
    # Parameter gradients sum over all sites in different orders (GEMMs over rows vs dense convs); an element
    # near 0 (a conv bias before a batch norm has gradient 0 in exact math) keeps an absolute error of the
    # model's gradient scale, so atol follows that scale.
    scale = max(p_.grad.abs().max().item() for p_ in ref.parameters())
    for pname, p_ in enc.named_parameters():
        torch.testing.assert_close(p_.grad, ref_params[pname].grad, atol=1e-4 * scale, rtol=5e-3,
                                   msg=lambda m, pname=pname: f"{pname}: {m}")
    ref_buffers = dict(ref.named_buffers())
    for bname, b_ in enc.named_buffers():
        torch.testing.assert_close(b_, ref_buffers[bname], atol=1e-5, rtol=1e-5, msg=lambda m, bname=bname: f"{bname}: {m}")
