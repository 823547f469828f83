"""Downstream tasks, probe / fine-tune, and the methods report, on tiny budgets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tcm_mim.eval import brain_lobe_task, chest_organ_task, evaluate_encoder
from tcm_mim.eval.report import main as eval_main
from tcm_mim.data.split import GUARD, block_slices
from tcm_mim.eval.tasks import _split
from tcm_mim.models import build_encoder


def test_split_keeps_test_block_and_guard_out_of_training():
    labelled = torch.zeros(100, dtype=torch.bool)
    labelled[10:90] = True
    train, test = block_slices(100, [(40, 60)], labelled.numpy())
    assert test == list(range(40, 60))
    assert not set(train) & set(range(40 - GUARD, 60 + GUARD))
    assert set(train) == set(range(10, 40 - GUARD)) | set(range(60 + GUARD, 90))
    assert _split(labelled.numpy()) == (train, test)  # the middle quarter of the labelled slices


@pytest.fixture(scope="module")
def tasks():
    return {"chest": chest_organ_task(size=160), "brain": brain_lobe_task(per_class=8)}


def test_tasks_are_well_formed(tasks):
    chest, brain = tasks["chest"], tasks["brain"]
    assert chest.classes[0] == "background" and {"lung", "heart", "liver"} <= set(chest.classes)
    assert chest.train_images.shape[1:] == (1, 160, 160) and chest.train_targets.shape[1:] == (160, 160)
    assert int(chest.test_targets.max()) < len(chest.classes)
    assert brain.kind == "classification" and len(brain.classes) == 5
    assert brain.train_targets.min() >= 0 and brain.train_targets.max() < 5
    assert len(brain.test_images) > 0


@pytest.mark.parametrize("mode", ["probe", "finetune"])
def test_evaluate_encoder_runs(tasks, mode):
    torch.manual_seed(0)
    enc = build_encoder("resnet_tiny", in_channels=1)
    for key in ("chest", "brain"):
        metric = evaluate_encoder(enc, tasks[key], mode=mode, steps=3)
        assert 0.0 <= metric <= 1.0
    with pytest.raises(ValueError, match="mode must be"):
        evaluate_encoder(enc, tasks["brain"], mode="linear")


def test_report_cli_tiny(tmp_path):
    assert eval_main(["--methods", "random", "spark", "--seeds", "0", "1", "--steps", "1", "--probe-steps", "2",
                      "--finetune-steps", "1", "--out", str(tmp_path), "--no-progress", "encoder=resnet_tiny",
                      "image_size=64", "batch_size=2", "decoder_width=16", "warmup_steps=1", "--curve-every", "1"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| random |" in report and "| spark |" in report and (tmp_path / "report.png").exists()
    assert "Paired differences to `random`" in report and "| spark | chest organs, probe (Dice) |" in report
    curves = json.loads((tmp_path / "curves.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())
    probe = curves["spark"][1]["chest organs, probe (Dice)"]
    assert [step for step, _ in probe] == [1, 2] and (tmp_path / "curves.png").exists()
    assert probe[-1][1] == results["spark"][1]["chest organs, probe (Dice)"]  # the curve ends at the score


def test_report_reuses_finished_runs_only_for_the_same_config(tmp_path, capsys):
    args = ["--methods", "spark", "--seeds", "0", "--steps", "1", "--probe-steps", "2", "--finetune-steps", "1",
            "--out", str(tmp_path), "--no-progress", "image_size=64", "batch_size=2", "decoder_width=16",
            "warmup_steps=1"]
    assert eval_main(args) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    capsys.readouterr()
    assert eval_main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text()) == first
    assert eval_main([*args, "lr=0.001"]) == 0  # another config: trained and evaluated again
    assert "reused" not in capsys.readouterr().out


def test_a_run_recorded_before_a_config_field_existed_counts_it_as_its_default():
    from tcm_mim.eval.report import _with_defaults
    from tcm_mim.train import PretrainConfig

    cfg = dataclasses.asdict(PretrainConfig(method="spark", seed=1))
    old = {"config": {k: v for k, v in cfg.items() if k != "amlp_ccl_weight"}, "trained": True}
    assert _with_defaults(old) == {"config": cfg, "trained": True}
    changed = {**cfg, "amlp_ccl_weight": 0.5}
    assert _with_defaults(old)["config"] != changed
