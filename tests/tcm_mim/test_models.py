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
    ("resenc3d_tiny", 3, (32, 32, 64), 1),  # 32^3-voxel patches: 2 per volume
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
    # Open defect (session 4, docs/encoders.md "Open"): on this case the masked-dense emulation's fp32 input
    # gradient is off by 0.48 at a scale of 17 against the same path in float64, first visible in the gradients of
    # stage 1's first (strided) block, while the compact path (what training runs) agrees with that float64
    # result to 6e-6. Strict: the test fails as soon as the defect is fixed, so the mark cannot outlive it.
    pytest.param("resenc3d_tiny", 3, (32, 32, 64), 1, "instance", marks=pytest.mark.xfail(
        strict=True, reason="masked-dense fp32 input gradient off vs float64 (open defect, docs/encoders.md)")),
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


# ---------------------------------------------------------------- encoders by their names
# timm needs torchvision, and torchvision from PyPI does not import beside this venv's CPU torch, so the
# standard layout is written out here: torchvision's ResNet (== timm's default ResNet) with its module names,
# classifier removed (timm's num_classes=0).


class _TvBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        cout = width * self.expansion
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: the stride on the 3x3
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TvResNet(nn.Module):
    def __init__(self, block, depths, widths, in_chans):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (d, w) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(d):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.depth = len(depths)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = []
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
            out.append(x)
        return out


_TV = {"resnet18": (_TvBasic, (2, 2, 2, 2), (64, 128, 256, 512)),
       "resnet50": (_TvBottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
       "resnet_tiny": (_TvBasic, (1, 1, 1, 1), (8, 16, 32, 64))}


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18", "resnet50"])
def test_resnet_weights_load_strictly_into_the_standard_layout(name):
    """export_resnet_state_dict loads with strict=True into torchvision's / timm's ResNet layout, and that
    network's per-stage outputs equal the sparse encoder's on an all-visible mask (eval mode, non-trivial
    running statistics), on both of the encoder's paths."""
    from tcm_mim.models import export_resnet_state_dict

    torch.manual_seed(0)
    enc = build_encoder(name, in_channels=1).eval()
    for m in enc.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ref = _TvResNet(*_TV[name], in_chans=1).eval()
    ref.load_state_dict(export_resnet_state_dict(enc), strict=True)
    image = torch.randn(2, 1, 64, 64)
    mask = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    expected = ref(image)
    for backend in (None, "reference"):
        set_backend(enc, backend)
        for i, ((f, m), e) in enumerate(zip(enc(image, mask), expected)):
            assert m.all()
            torch.testing.assert_close(f, e, atol=2e-4, rtol=2e-4, msg=lambda s, i=i: f"{backend} stage {i}: {s}")


def test_resnet_parameter_counts_are_torchvisions():
    """torchvision's published counts (resnet18 11,689,512, resnet50 25,557,032, RGB, 1000 classes) minus fc."""
    for name, published, fc in (("resnet18", 11_689_512, 512 * 1000 + 1000),
                                ("resnet50", 25_557_032, 2048 * 1000 + 1000)):
        enc = build_encoder(name, in_channels=3)
        assert sum(p.numel() for p in enc.parameters()) == published - fc, name


def test_no_bias_directly_before_a_norm():
    enc = build_encoder("resnet18")
    for name, m in enc.named_modules():
        if hasattr(m, "conv") and hasattr(m, "norm"):
            assert getattr(m.conv, "bias", None) is None, name
    assert enc.stem.conv.bias is None


def test_export_resnet_state_dict_refuses_other_encoders():
    from tcm_mim.models import export_resnet_state_dict

    with pytest.raises(ValueError, match="2-D SparseResNet with the ResNet stem"):
        export_resnet_state_dict(build_encoder("resnet3d_tiny", dim=3))


def test_drop_path_same_on_both_paths_and_off_in_eval():
    torch.manual_seed(0)
    enc = build_encoder("resnet_tiny", drop_path=0.5)
    ref = set_backend(copy.deepcopy(enc), "reference")
    visible = _patch_mask(2, (2, 2), 0.5, seed=2)
    mask = tcm_kernels.upsample_mask(visible.reshape(2, 1, 2, 2), 32)
    image = torch.randn(2, 1, 64, 64) * mask
    outs = []
    for model in (enc, ref):
        torch.manual_seed(5)
        outs.append(model(image, mask)[-1][0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=2e-4)
    torch.manual_seed(6)
    dropped = enc(image, mask)[-1][0]
    assert not torch.allclose(dropped, outs[0])  # another draw drops other branches
    enc.eval()
    evals = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        evals.append(enc(image, mask)[-1][0])
    assert torch.equal(*evals)


# ---------------------------------------------------------------- SparK's densify and decoder


def test_decoder_input_is_normed_features_then_mask_tokens():
    """Per scale, as SparK: the sparse norm over the active sites, then the mask token at the masked sites."""
    torch.manual_seed(0)
    model = SparKMIM(build_encoder("resnet_tiny"), decoder_width=32)
    assert all(t.abs().max() <= 0.02 for t in model.mask_tokens)  # truncated at one std
    seen = {}
    model.decoder.register_forward_pre_hook(lambda _m, args: seen.setdefault("feats", args[0]))
    visible = _patch_mask(4, (2, 2), 0.5, seed=1)
    model(torch.randn(4, 1, 64, 64), visible)
    for i, (f, tok) in enumerate(zip(seen["feats"], model.mask_tokens)):
        mask = tcm_kernels.upsample_mask(visible.reshape(4, 1, 2, 2), 2 ** (3 - i))
        rows = f.movedim(1, -1)[mask[:, 0]]
        torch.testing.assert_close(rows.mean(0), torch.zeros_like(rows[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(rows.var(0, unbiased=False), torch.ones_like(rows[0]), atol=1e-2, rtol=0)
        masked_rows = f.movedim(1, -1)[~mask[:, 0]]
        assert torch.equal(masked_rows, tok.detach().expand_as(masked_rows))


def test_spark_decoder_structure_and_projections():
    enc = build_encoder("resnet_tiny")
    model = SparKMIM(enc, decoder="spark", decoder_width=64)
    dec = model.decoder
    assert len(dec.blocks) == 5  # log2(patch 32)
    assert [b[0].in_channels for b in dec.blocks] == [64, 32, 16, 8, 4]
    for b in dec.blocks:
        up, conv1, bn1, act, conv2, bn2 = b
        assert (up.kernel_size, up.stride, up.padding) == ((4, 4), (2, 2), (1, 1))
        assert isinstance(act, nn.ReLU6) and conv1.bias is None and conv2.bias is None
    assert [p.kernel_size for p in dec.proj] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [p.kernel_size for p in model.decoder.proj] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [p.kernel_size for p in SparKMIM(build_encoder("resnet_tiny")).decoder.proj] == \
        [(1, 1), (3, 3), (3, 3), (3, 3)]
    out = model(torch.randn(2, 1, 64, 64), _patch_mask(2, (2, 2), 0.5))
    assert out.pred.shape == (2, 1, 64, 64) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="decoder must be one of"):
        SparKMIM(enc, decoder="unet")


def test_param_groups_exempt_mask_tokens_norms_and_biases():
    from tcm_mim.models import param_groups

    model = SparKMIM(build_encoder("resnet_tiny"), decoder_width=32)
    decay, no_decay = param_groups(model.named_parameters(), 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert all(id(t) in ids for t in model.mask_tokens)
    assert id(model.encoder.stem.norm.weight) in ids and id(model.densify_norms[0].bias) in ids
    assert id(model.encoder.stem.conv.weight) not in ids
    assert sorted(map(id, decay["params"] + no_decay["params"])) == sorted(map(id, model.parameters()))


def test_sync_decoder_norms_on_gpu_devices_only():
    from tcm_mim.models import sync_decoder_norms

    model = SparKMIM(build_encoder("resnet_tiny"), decoder="spark", decoder_width=32)
    assert not sync_decoder_norms(model, torch.device("cpu"))  # torch's SyncBatchNorm has no CPU forward
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sync_decoder_norms(model, torch.device("cuda"))  # the conversion itself needs no GPU
    norms = [m for m in model.decoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
