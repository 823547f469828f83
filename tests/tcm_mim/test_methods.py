"""Each method as its authors define it (docs/methods.md): TCM's per-region ratios, AMLP's per-image
attention weight, AnatoMask's selection signal and EMA ramp, config errors. Tiny sizes only."""

from __future__ import annotations

import math

import pytest
import torch

from tcm_mim.masking import realised_ratios, region_ratio_mask
from tcm_mim.train.amlp import attention_recon_loss
from tcm_mim.train.config import ConfigError, PretrainConfig


@pytest.mark.parametrize("roi_ratio,bg_ratio", [(0.8, 0.4), (0.7, 0.3), (0.6, 0.2)])
def test_region_ratios_fix_each_regions_share(roi_ratio, bg_ratio):
    """Every image masks round(r * count) of each region, whatever its ROI share (the overall share varies)."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    roi = torch.zeros(6, n, dtype=torch.bool)
    for i, share in enumerate((0.0, 0.1, 0.3, 0.6, 0.9, 1.0)):  # ROI shares around and above 4/7
        roi[i, torch.randperm(n, generator=gen)[:round(share * n)]] = True
    visible = region_ratio_mask(roi, roi_ratio, bg_ratio, seed=3, offset=7)
    for i in range(6):
        n_roi = int(roi[i].sum())
        assert int((~visible[i] & roi[i]).sum()) == math.floor(roi_ratio * n_roi + 0.5)
        assert int((~visible[i] & ~roi[i]).sum()) == math.floor(bg_ratio * (n - n_roi) + 0.5)
    ratios = realised_ratios(visible, roi)
    assert abs(float(ratios["roi_masked"]) - roi_ratio) < 0.02 and abs(float(ratios["bg_masked"]) - bg_ratio) < 0.02
    assert torch.equal(visible, region_ratio_mask(roi, roi_ratio, bg_ratio, seed=3, offset=7))
    assert not torch.equal(visible, region_ratio_mask(roi, roi_ratio, bg_ratio, seed=3, offset=8))


def test_region_ratios_choose_uniformly_within_a_region():
    roi = torch.zeros(1, 8, dtype=torch.bool)
    roi[0, :4] = True
    counts = torch.zeros(8)
    for offset in range(400):
        counts += (~region_ratio_mask(roi, 0.5, 0.25, seed=0, offset=offset)[0]).float()
    freq = counts / 400
    assert torch.all((freq[:4] - 0.5).abs() < 0.1) and torch.all((freq[4:] - 0.25).abs() < 0.1), freq


def test_region_ratio_mask_errors():
    with pytest.raises(ValueError, match="roi must be bool"):
        region_ratio_mask(torch.zeros(2, 4), 0.8, 0.4, seed=0, offset=0)
    with pytest.raises(ValueError, match="background_ratio must be in"):
        region_ratio_mask(torch.zeros(2, 4, dtype=torch.bool), 0.8, 1.5, seed=0, offset=0)


def test_amlp_attention_weight_is_normalised_per_image():
    """An image with 10x larger errors does not change the weights of the other image's patches."""
    gen = torch.Generator().manual_seed(0)
    e = torch.rand(2, 8, generator=gen)
    visible = torch.zeros(2, 8, dtype=torch.bool)
    visible[:, :3] = True
    scaled = e.clone()
    scaled[1] *= 10
    expected_num, expected_den = 0.0, 0.0
    for i in range(2):
        m = ~visible[i]
        w = 1 + scaled[i][m] / scaled[i][m].mean()
        expected_num += float((w * scaled[i][m]).sum())
        expected_den += float(w.sum())
    torch.testing.assert_close(attention_recon_loss(scaled, visible), torch.tensor(expected_num / expected_den))


def test_amlp_refuses_mask_ratio():
    with pytest.raises(ConfigError, match="mask_ratio is not used by method amlp"):
        PretrainConfig(method="amlp", mask_ratio=0.6)
    PretrainConfig(method="amlp")  # the ramp


def test_ema_ramp():
    cfg = PretrainConfig(method="anatomask", steps=400, ema=0.999, ema_end=0.9999)
    assert cfg.ema_at(0) == pytest.approx(0.999)
    assert cfg.ema_at(50) == pytest.approx(0.999 + 0.5 * 0.0009)
    assert cfg.ema_at(100) == pytest.approx(0.9999) and cfg.ema_at(399) == pytest.approx(0.9999)
    assert PretrainConfig(method="anatomask", ema=0.99).ema_at(123) == 0.99


@pytest.mark.parametrize("method", ["spark", "tcm", "anatomask", "amlp"])
def test_paper_configs_load_and_select_the_authors_settings(method):
    import pathlib

    from tcm_mim.train.config import load_config

    cfg = load_config(pathlib.Path(__file__).parents[2] / "configs" / f"{method}_paper.yaml")
    assert cfg.method == method and cfg.decoder == "spark"
    if method == "tcm":
        assert cfg.tcm_masking == "region_ratios" and (cfg.region_roi_ratio, cfg.region_background_ratio) == (0.8, 0.4)
        assert cfg.contrastive_weight == 0.0
    if method == "anatomask":
        assert (cfg.ema, cfg.ema_end, cfg.max_grad_norm, cfg.ratio_at(0)) == (0.999, 0.9999, 12.0, 0.6)
    if method in ("spark", "tcm", "amlp"):
        assert (cfg.encoder, cfg.decoder_width, cfg.drop_path) == ("resnet50", 768, 0.05)


def test_visible_probe_patch_never_outranks_a_masked_one():
    """AnatoMask's score: whatever the probe's errors, a patch the probe left visible scores 0, below or equal to
    every patch it masked, so `hardest` selection takes masked-probe patches first."""
    import tcm_kernels
    from tcm_mim.train.teacher import masked_probe_scores

    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(4, 16, generator=gen) * 5
    probe = tcm_kernels.sample_mask(torch.zeros(4, 16), 0.6, strategy="uniform", seed=1).visible
    errors[probe] += 100  # visible patches with huge (unconstrained) errors
    scores = masked_probe_scores(errors, probe)
    for i in range(4):
        assert scores[i][probe[i]].max() <= scores[i][~probe[i]].min()
    hard = tcm_kernels.sample_mask(scores, 0.6, strategy="hardest", hard_fraction=1.0, seed=2).visible
    assert not (~hard & probe).any()  # the 60 % hardest are exactly the probe's masked 60 %


def test_eval_mode_restores_modes_and_keeps_running_stats():
    from tcm_mim.models import SparKMIM, build_encoder
    from tcm_mim.train.teacher import eval_mode

    model = SparKMIM(build_encoder("resnet_tiny"), decoder_width=16).train()
    model.decoder.eval()  # a submodule in its own mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with eval_mode(model), torch.no_grad():
        model(torch.randn(2, 1, 64, 64), torch.ones(2, 4, dtype=torch.bool))
    assert model.training and not model.decoder.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ema_update_follows_parameters_and_running_stats():
    from tcm_mim.train.teacher import ema_update

    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        student.running_mean.fill_(1.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, torch.full((3,), 1.1))
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 0.1))
    assert int(teacher.num_batches_tracked) == 7


# ---------------------------------------------------------------- through the trainer (tiny runs)

TINY = dict(encoder="resnet_tiny", decoder_width=16, image_size=64, batch_size=2, steps=4, warmup_steps=1,
            checkpoint_every=4, image_every=0, dataset="chest_ct", prompts=["trachea"], num_workers=0)


def _trainer(tmp_path, method, **kw):
    from tcm_mim.train import Trainer

    return Trainer(PretrainConfig(method=method, out_dir=str(tmp_path), **{**TINY, **kw}))


def test_anatomask_selection_scores_teacher_and_ema_ramp(tmp_path):
    t = _trainer(tmp_path, "anatomask", mask_ratio=0.5, ema=0.5, ema_end=0.9)
    method = t.method
    assert not method.teacher.training
    images, _ = t.batch(0)
    scores = method.selection_scores(images, 0.5, draw=0)
    probe = t.mask(torch.zeros(images.shape[0], t.num_patches), "uniform", 0.5, 1)  # the probe of draw 0
    assert (scores[probe] == 0).all() and (scores[~probe] > 0).all()
    teacher0 = [p.detach().clone() for p in method.teacher.parameters()]
    t.train(progress=False, stop_after=1)
    momentum = t.cfg.ema_at(0)
    assert momentum == 0.5 and not method.teacher.training
    for p_t, p_0, p_s in zip(method.teacher.parameters(), teacher0, t.model.parameters()):
        torch.testing.assert_close(p_t, momentum * p_0 + (1 - momentum) * p_s.detach())


def test_amlp_probe_leaves_running_statistics(tmp_path):
    t = _trainer(tmp_path, "amlp")
    images, _ = t.batch(0)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    difficulty = t.per_patch_difficulty(t.model, images, 0)
    assert difficulty.shape == (2, t.num_patches) and (difficulty >= 0).all()
    assert t.model.training
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


def test_tcm_region_ratios_in_the_trainer_and_logged_shares(tmp_path):
    import csv

    import tcm_kernels

    t = _trainer(tmp_path, "tcm", tcm_masking="region_ratios", image_size=128)
    _, saliency = t.batch(0)
    views, roi = t.method.views(saliency, 0, 0)
    assert torch.equal(roi, tcm_kernels.patch_scores(saliency, 32, reduce="max") >= 0.5)
    for v in range(2):
        for i in range(2):
            visible, r = views[v * 2 + i], roi[i]
            assert int((~visible & r).sum()) == math.floor(0.8 * int(r.sum()) + 0.5)
            assert int((~visible & ~r).sum()) == math.floor(0.4 * int((~r).sum()) + 0.5)
    t.train(progress=False, stop_after=2)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 2 and all(0 <= float(row[k]) <= 1 for row in rows for k in ("masked", "roi_masked",
                                                                                       "bg_masked"))


def test_spark_keys_reach_the_model_and_the_optimiser(tmp_path):
    from tcm_mim.models.spark import SparKDecoder

    with pytest.raises(ConfigError, match="decoder_width must be at least the patch size 32 for decoder spark"):
        PretrainConfig(method="spark", decoder="spark", decoder_width=16)
    t = _trainer(tmp_path, "spark", decoder="spark", decoder_width=32, drop_path=0.1, weight_decay=0.04)
    assert isinstance(t.model.decoder, SparKDecoder)
    assert t.model.encoder.stages[-1][-1].drop_path == pytest.approx(0.1)
    decay, exempt = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.04 and exempt["weight_decay"] == 0.0
    assert any(p is t.model.mask_tokens[0] for p in exempt["params"])
    t.train(progress=False, stop_after=1)
    resumed = _trainer(tmp_path, "spark", decoder="spark", decoder_width=32, drop_path=0.1, weight_decay=0.04)
    resumed._resume(apply_changes=False)
    assert resumed.step == 1 and [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.04, 0.0]
