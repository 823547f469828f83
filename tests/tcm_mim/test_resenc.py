"""The nnU-Net-style residual encoder (``resenc3d``, ``resenc3d_tiny``): its layout, a plain-torch twin written
here, the SparK decoders on its 6 stages, and a 3-D pretraining step.

The masked emulation, dense export and compact-vs-masked-dense checks of ``resenc3d_tiny`` run with the other
encoders in test_models.py.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tcm_kernels.nn as tnn
from tcm_mim.models import SparKMIM, build_encoder
from tcm_mim.models.encoders import encoder_patch_size
from tcm_mim.models.layers import SparseStridedConv
from tcm_mim.models.spark import SparKDecoder
from tcm_mim.train import PretrainConfig, Trainer, load_config

CONFIG_3D = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pretrain_tcm3d.yaml"


class _RefConvNorm(nn.Module):
    """conv (no bias) + affine instance norm, as nnU-Net's ConvDropoutNormReLU without its nonlinearity."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, stride, k // 2, bias=False)
        self.norm = nn.InstanceNorm3d(cout, affine=True)

    def forward(self, x):
        return self.norm(self.conv(x))


class _RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a, self.b = _RefConvNorm(cin, cout, 3, stride), _RefConvNorm(cout, cout, 3)
        self.shortcut = None if cin == cout and stride == 1 else _RefConvNorm(cin, cout, 1, stride)

    def forward(self, x):
        y = self.b(F.leaky_relu(self.a(x), 0.01))
        return F.leaky_relu(y + (x if self.shortcut is None else self.shortcut(x)), 0.01)


class _RefResEnc(nn.Module):
    """A dense residual encoder in plain torch, nnU-Net ResEnc's layout with a strided 1^3 projection shortcut;
    module names match ours so that the sparse encoder's state dict loads strictly."""

    def __init__(self, depths, widths, cin=1):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = _RefConvNorm(cin, widths[0], 3)
        self.stages = nn.ModuleList()
        c = widths[0]
        for i, (d, w) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(d):
                blocks.append(_RefBlock(c, w, 2 if i > 0 and j == 0 else 1))
                c = w
            self.stages.append(nn.ModuleList(blocks))

    def forward(self, x):
        x = F.leaky_relu(self.stem.conv(x), 0.01)
        out = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
            out.append(x)
        return out


def test_resenc3d_is_nnunet_resenc_m():
    enc = build_encoder("resenc3d", dim=3, in_channels=1)
    assert enc.downsample_ratio == encoder_patch_size("resenc3d") == 32
    assert enc.channels == [32, 64, 128, 256, 320, 320]
    assert [len(s) for s in enc.stages] == [1, 3, 4, 6, 6, 6] and len(enc.downs) == 0
    assert enc.stem.conv.conv.weight.shape == (32, 1, 3, 3, 3) and isinstance(enc.stem.conv.conv, tnn.SubMConv3d)
    for i, stage in enumerate(enc.stages):
        for j, block in enumerate(stage):
            first = i > 0 and j == 0
            assert block.stride == (2 if first else 1) and block.negative_slope == 0.01
            assert isinstance(block.a.conv, SparseStridedConv if first else tnn.SubMConv3d)
            assert block.a.conv.weight.shape[2:] == (3, 3, 3)
            if first:
                assert (block.a.conv.stride, block.shortcut.conv.kernel, block.shortcut.conv.stride) == (2, 1, 2)
            else:
                assert block.shortcut is None
    norms = [m for m in enc.modules() if isinstance(m, (tnn.SparseInstanceNorm3d, tnn.SparseBatchNorm3d))]
    assert len(norms) == 1 + 2 * 26 + 5 and all(isinstance(m, tnn.SparseInstanceNorm3d) and m.affine for m in norms)
    ref = _RefResEnc((1, 3, 4, 6, 6, 6), (32, 64, 128, 256, 320, 320))
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in ref.parameters())


def test_resenc3d_tiny_equals_a_plain_torch_residual_encoder_on_all_visible():
    # float64: the deepest stage is 1 x 1 x 2 sites, where an instance norm over 2 values amplifies fp32
    # rounding differences between the two conv summation orders to ~3e-3; in float64 both agree to 1e-10.
    torch.manual_seed(0)
    enc = build_encoder("resenc3d_tiny", dim=3, in_channels=1).double()
    for m in enc.modules():  # non-trivial affine parameters
        if isinstance(m, tnn.SparseInstanceNorm3d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    ref = _RefResEnc((1,) * 6, enc.channels).double()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if "running" not in k}, strict=True)
    image = torch.randn(2, 1, 32, 32, 64, dtype=torch.float64)
    mask = torch.ones(2, 1, 32, 32, 64, dtype=torch.bool)
    feats = enc(image, mask)
    assert enc.runs_compact()
    for i, ((f, m), r) in enumerate(zip(feats, ref(image))):
        assert m.all() and f.shape == r.shape
        torch.testing.assert_close(f, r, atol=1e-8, rtol=1e-8, msg=lambda s, i=i: f"stage {i}: {s}")
    assert (feats[0][0] < 0).any()  # leaky ReLU, not ReLU


@pytest.mark.parametrize("decoder", ["light", "spark"])
def test_spark_decoders_use_every_stage_of_a_six_stage_encoder(decoder):
    """The full-resolution stage has stride 1: SparK's decoder adds it after its last block; every parameter
    (mask tokens, densify norms and projections of all 6 scales) gets a gradient."""
    torch.manual_seed(0)
    model = SparKMIM(build_encoder("resenc3d_tiny", dim=3), dim=3, decoder=decoder, decoder_width=32)
    assert model.patch_size == 32 and len(model.decoder.proj) == 6
    if decoder == "spark":
        assert len(model.decoder.blocks) == 5
    image = torch.randn(2, 1, 32, 64, 64)
    # 2 visible patches per volume: an instance norm over a single site outputs its bias, whatever its input,
    # and would leave the deepest convs without gradient.
    visible = torch.tensor([[True, False, False, True], [False, True, True, False]])
    out = model(image, visible)
    assert out.pred.shape == image.shape and out.per_patch.shape == (2, 4)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    with pytest.raises(ValueError, match=r"at least 2\^\(stages - 1\), got 32 for 7 stages"):
        SparKDecoder(3, [4] * 7, 64, 1, 32)


def test_pretraining_3d_with_resenc3d_tiny(tmp_path):
    cfg = PretrainConfig(method="tcm", encoder="resenc3d_tiny", decoder_width=8, image_size=64, batch_size=2,
                         steps=2, warmup_steps=1, image_every=0, checkpoint_every=2, dataset="chest_ct",
                         prompts=["trachea"], out_dir=str(tmp_path))
    trainer = Trainer(cfg)
    assert trainer.dim == 3 and trainer.grid == (2, 2, 2)
    trainer.train(progress=False)
    assert (tmp_path / "checkpoint.pt").exists()


def test_3d_config_uses_the_realistic_encoder():
    cfg = load_config(CONFIG_3D, [])
    assert cfg.encoder == "resenc3d" and cfg.spatial_dims == 3
    assert cfg.image_size % encoder_patch_size(cfg.encoder) == 0 and cfg.image_size // 32 >= 2


def test_profile_breakdown_covers_every_op_once(capsys):
    """benchmarks/profile_encoder3d: every profiled op's self time lands in exactly one part, and the parts that
    the encoder has are non-zero."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import profile_encoder3d as prof_mod

    assert prof_mod.main(["--encoder", "resenc3d_tiny", "--side", "64", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.strip("|").split("|")[:2] for line in out.splitlines() if line.startswith("| ")
                and not line.startswith("| part"))
    parts = {k.strip(): float(v) for k, v in rows.items()}
    assert tuple(parts) == prof_mod.CATEGORIES
    for part in ("conv fwd", "conv bwd", "norms", "downsample", "kernel maps", "layout", "activations + adds"):
        assert parts[part] > 0, part

    enc = build_encoder("resenc3d_tiny", dim=3)
    mask = torch.zeros(1, 1, 64, 64, 64, dtype=torch.bool)
    mask[..., :32, :, :] = True
    handles, undo = prof_mod._range_hooks(enc), prof_mod._function_ranges()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sum(f.sum() for f, _ in enc(torch.randn(1, 1, 64, 64, 64) * mask, mask)).backward()
    finally:
        for h in handles:
            h.remove()
        for u in undo:
            u()
    events = prof.events()
    totals = prof_mod.breakdown(events)
    assert sum(totals.values()) == pytest.approx(sum(e.self_cpu_time_total for e in events) / 1e6, rel=1e-9)
    assert totals["other"] < 0.2 * sum(totals.values())
