"""Downstream tasks, probe / fine-tune, and the methods report, on tiny budgets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tcm_mim.eval import brain_lobe_task, chest_organ_task, evaluate_encoder
from tcm_mim.eval.report import main as eval_main
from tcm_mim.data.split import GUARD, block_slices
from tcm_mim.eval.probe import learning_curve
from tcm_mim.eval.tasks import _split, validation_blocks, with_label_fraction
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
    assert [p["step"] for p in probe] == [1, 2] and (tmp_path / "curves.png").exists()
    assert probe[-1]["validation"] is None  # no --select-steps: no validation split carved
    assert probe[-1]["test"] == results["spark"][1]["chest organs, probe (Dice)"]  # the curve ends at the score


def test_comparison_chooses_steps_on_validation_at_each_label_fraction_with_paper_configs(tmp_path):
    from tcm_mim.eval.report import choose_steps

    assert eval_main(["--methods", "random", "spark_paper=configs/spark_paper.yaml", "--seeds", "0", "1",
                      "--steps", "1", "--probe-steps", "2", "--finetune-steps", "4", "--curve-every", "2",
                      "--select-steps", "--label-fraction", "1.0", "0.1", "--out", str(tmp_path), "--no-progress",
                      "encoder=resnet_tiny", "image_size=64", "batch_size=2", "decoder_width=32",
                      "warmup_steps=1"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| spark_paper |" in report and "Step counts chosen from the validation curves" in report
    assert "Paired differences to `random`" in report and "Smallest difference resolved" in report
    curves = json.loads((tmp_path / "curves.json").read_text())
    steps = json.loads((tmp_path / "steps.json").read_text())
    results = json.loads((tmp_path / "results.json").read_text())
    label = "chest organs, fine-tune, 10% labels (Dice)"
    assert set(steps) == set(curves["random"][0]) and label in steps
    assert "brain lobes, probe, 10% labels (acc.)" not in steps  # the brain probe is scored at 1.0 only
    for method, runs in curves.items():
        for run, scores in zip(runs, results[method]):
            for name, curve in run.items():
                assert all(p["validation"] is not None for p in curve)
                assert scores[name] == next(p["test"] for p in curve if p["step"] == steps[name]["steps"])
    # the choice reads the validation curves only: other test values change no step count
    scrambled = {m: [{k: [{**p, "test": 1.0 - p["test"]} for p in c] for k, c in run.items()} for run in runs]
                 for m, runs in curves.items()}
    assert choose_steps(scrambled) == steps
    assert "chest organs, fine-tune (Dice)" in (tmp_path / "curves.csv").read_text()
    run = json.loads((tmp_path / "spark_paper_seed0" / "eval.json").read_text())
    assert run["key"]["config"]["decoder"] == "spark" and run["key"]["config"]["mask_ratio"] == 0.6


def test_step_rule_first_step_within_one_percent_of_the_smoothed_maximum():
    from tcm_mim.eval.report import choose_steps, converged_step

    rising = [(50, 0.1), (100, 0.5), (150, 0.7), (200, 0.8), (250, 0.8), (300, 0.8), (350, 0.8)]
    assert converged_step(rising) == 300  # smoothed over 3 points: 0.8 first reached at 300
    assert converged_step([(50, 0.0), (100, 0.0)]) == 50  # a flat curve: its first step
    noisy = [(50 * (i + 1), v) for i, v in enumerate([0.5, 0.5, 0.9, 0.5, 0.5, 0.8, 0.8, 0.8])]
    assert converged_step(noisy) == 400  # the sustained level decides, not the one high point at 150
    curve = lambda values: [{"step": 50 * (i + 1), "validation": v, "test": 0.0} for i, v in enumerate(values)]
    chosen = choose_steps({"a": [{"x": curve([0.9] * 5)}] * 2,  # mean over seeds, then the rule, then the max
                           "b": [{"x": curve([0.1, 0.2, 0.3, 0.9, 0.9])}, {"x": curve([0.1, 0.2, 0.3, 0.7, 0.7])}]})
    assert chosen["x"]["per_method"] == {"a": 50, "b": 250} and chosen["x"]["steps"] == 250
    assert chosen["x"]["budget"] == 250
    with pytest.raises(ValueError, match="no validation curve"):
        choose_steps({"a": [{"x": [{"step": 1, "validation": None, "test": 0.0}]}]})


@pytest.mark.parametrize("mode", ["probe", "finetune"])
def test_a_curve_point_is_the_score_of_a_run_that_long(tasks, mode):
    torch.manual_seed(0)
    enc = build_encoder("resnet_tiny", in_channels=1)
    chest = dataclasses.replace(tasks["chest"], train_images=tasks["chest"].train_images[:6],
                                train_targets=tasks["chest"].train_targets[:6])
    curve = learning_curve(enc, chest, mode=mode, steps=4, every=2, seed=1)
    assert [p["step"] for p in curve] == [2, 4]
    assert curve[0]["test"] == evaluate_encoder(enc, chest, mode=mode, steps=2, seed=1)


def test_validation_split_is_carved_from_the_training_side():
    train, test = list(range(0, 40)) + list(range(60, 100)), list(range(43, 57))
    rest, val = validation_blocks(train, test, fraction=0.2)
    assert val == list(range(32, 40)) + list(range(60, 68))  # nearest the test block, half on each side
    assert not set(val) & set(test) and not set(rest) & set(val) and set(rest) < set(train)
    assert not set(rest) & set(range(32 - GUARD, 68 + GUARD))  # a guard band between validation and training
    chest = chest_organ_task(size=64, validation=True)
    assert len(chest.val_images) == round(0.2 * (len(chest.train_images) + len(chest.val_images) + 2 * GUARD))
    brain = brain_lobe_task(per_class=8, validation=True)
    assert torch.bincount(brain.val_targets).tolist() == torch.bincount(brain.test_targets).tolist() == [8] * 5
    few = with_label_fraction(chest, 0.1, seed=0)
    assert len(few.train_images) == round(0.1 * len(chest.train_images))
    assert few.val_images is chest.val_images and few.test_images is chest.test_images


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
