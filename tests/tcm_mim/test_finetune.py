"""tcm-finetune: the CORN / mean-teacher terms on hand-built inputs, the splits, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tcm_mim.finetune import (DynamicFeaturePool, FinetuneConfig, ccm_loss, ema_update, sigmoid_rampup,
                              similarity_consistency_loss)
from tcm_mim.finetune.cli import main as finetune_main
from tcm_mim.finetune.data import build_split
from tcm_mim.finetune.model import load_pretrained_encoder
from tcm_mim.models import SparKMIM, build_encoder
from tcm_mim.train import checkpoint


def test_ccm_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    lab = torch.randn(12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    unl = torch.randn(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2] * 4)
    pseudo = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    keep = torch.tensor([True] * 9 + [False])
    # class 2 has 3 kept unlabelled rows, 0 and 1 have 3 each: every class contributes
    assert torch.autograd.gradcheck(lambda a, b: ccm_loss(a, labels, b, pseudo, keep, 3, max_rows=64), (lab, unl))


def test_ccm_skips_classes_without_rows_and_ignores_unconfident_rows():
    lab = torch.randn(8, 2, dtype=torch.float64)
    unl = torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pseudo = torch.tensor([0, 0, 0, 1, 1, 1])
    keep = torch.tensor([True, True, True, False, True, True])
    from tcm_kernels import coral_loss
    want = (coral_loss(lab[:4], unl[:3]) + coral_loss(lab[4:], unl[4:])) / 2
    assert torch.allclose(ccm_loss(lab, labels, unl, pseudo, keep, 3), want)
    none_kept = ccm_loss(lab, labels, unl, pseudo, torch.zeros(6, dtype=torch.bool), 3)
    assert none_kept.item() == 0.0


def test_dfp_keeps_exactly_the_confident_rows():
    pool = DynamicFeaturePool(dim=2, capacity=4, tau=0.8)
    feats = torch.arange(10.0).reshape(5, 2)
    conf = torch.tensor([0.9, 0.5, 0.81, 0.8, 0.99])  # 0.8 is not above tau
    kept = pool.select(feats, conf)
    assert torch.equal(kept, feats[[0, 2, 4]])
    pool.push(kept)
    assert torch.equal(pool.rows(), feats[[0, 2, 4]])
    pool.push(torch.tensor([[100.0, 101.0], [102.0, 103.0]]))  # capacity 4: the oldest row leaves
    assert len(pool) == 4
    assert {tuple(r) for r in pool.rows().tolist()} == {(4.0, 5.0), (8.0, 9.0), (100.0, 101.0), (102.0, 103.0)}
    with pytest.raises(ValueError, match="got 1 of 1 rows with NaN"):
        pool.push(torch.tensor([[float("nan"), 0.0]]))


def test_similarity_consistency_is_zero_for_equal_models_and_positive_otherwise():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(7, 4, generator=gen, requires_grad=True)
    pool = torch.randn(9, 4, generator=gen)
    same = similarity_consistency_loss(rows, rows.detach().clone(), pool, 0.1)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    same.backward()
    assert rows.grad.abs().max() < 1e-5
    other = similarity_consistency_loss(rows, torch.randn(7, 4, generator=gen), pool, 0.1)
    assert other.item() > 1e-3


def test_ema_update_by_hand():
    student, teacher = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(5.0)
    assert ema_update(teacher, student, 0.9, step=100) == pytest.approx(0.9)
    assert torch.allclose(teacher.weight, torch.full((2,), 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.equal(teacher.running_mean, student.running_mean)  # buffers are copied
    assert ema_update(teacher, student, 0.9, step=0) == 0.0  # Tarvainen's warm start: teacher = student
    assert torch.equal(teacher.weight, student.weight)
    assert ema_update(teacher, student, 0.99, step=3) == pytest.approx(0.75)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(50, 10) == sigmoid_rampup(0, 0) == 1.0


def test_chest_split_fraction_and_no_test_leakage():
    cfg = FinetuneConfig(image_size=32, label_fraction=0.25, seed=3)
    split = build_split(cfg)
    n_train = len(split.labelled_images) + len(split.unlabelled_images)
    assert len(split.labelled_images) == round(0.25 * n_train)
    train = torch.cat([split.labelled_images, split.unlabelled_images]).flatten(1)
    test = split.test_images.flatten(1)
    assert not (torch.cdist(test, train) == 0).any()  # no test slice is a training slice
    other_seed = build_split(FinetuneConfig(image_size=32, label_fraction=0.25, seed=4))
    assert not torch.equal(other_seed.labelled_images, split.labelled_images)
    with pytest.raises(ValueError, match="none is left unlabelled"):
        build_split(FinetuneConfig(image_size=32, label_fraction=0.999))


def _tiny(tmp_path, semi: str, dim: int, **kw) -> list[str]:
    size = {2: ["--image-size", "32", "--encoder", "resnet_tiny"],
            3: ["--dim", "3", "--image-size", "16", "--depth", "8", "--encoder", "resnet3d_tiny"]}[dim]
    args = ["--semi", semi, "--steps", "2", "--batch-size", "2", "--unlabelled-batch-size", "2", "--log-every", "1",
            "--rampup-steps", "0", "--tau", "0", "--max-rows", "64", "--out-dir", str(tmp_path / f"{semi}{dim}"), *size]
    return args + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("semi", ["none", "mean_teacher", "corn"])
def test_end_to_end_each_mode(tmp_path, semi, dim, capsys):
    assert finetune_main(_tiny(tmp_path, semi, dim)) == 0
    out = tmp_path / f"{semi}{dim}"
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["dice"] <= 1.0 and result["config"]["semi"] == semi
    assert ("teacher" in result["scores"]) == (semi != "none")
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 3
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    if semi == "corn":  # tau 0: every site is confident, so the pool fills and the DFP term runs from step 2 on
        assert float(last["dfp"]) > 0 and int(last["pool_rows"]) > 0 and int(last["confident_rows"]) > 0
        # CCM is > 0 only when the untrained teacher's pseudo-classes meet the labelled classes: not asserted here
        assert float(last["ccm"]) >= 0
    else:
        assert float(last["ccm"]) == float(last["dfp"]) == 0.0
    assert (float(last["consistency"]) > 0) == (semi != "none")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and (state["teacher"] is None) == (semi == "none")
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(out)


def test_zero_weights_remove_the_terms(tmp_path):
    args = _tiny(tmp_path, "corn", 2, ccm_weight=0, dfp_weight=0, consistency_weight=0)
    assert finetune_main(args) == 0
    rows = (tmp_path / "corn2" / "log.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert float(last["ccm"]) == float(last["dfp"]) == float(last["consistency"]) == 0.0
    assert int(last["pool_rows"]) == 0


def test_folder_task_splits_by_scan(tmp_path):
    nib = pytest.importorskip("nibabel")
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        vol = rng.normal(0, 50, (24, 24, 6)).astype(np.float32)
        lab = np.zeros((24, 24, 6), dtype=np.int16)
        lab[6:14, 6:14, :] = 1
        lab[15:20, 10:20, 2:] = 4
        nib.save(nib.Nifti1Image(vol, np.eye(4)), images / f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), labels / f"ct{i}.nii.gz")
    (tmp_path / "names.txt").write_text("1 liver\n4 spleen\n")
    cfg = FinetuneConfig(task=str(images), label_dir=str(labels), label_names=str(tmp_path / "names.txt"),
                         image_size=32, label_fraction=0.5)
    split = build_split(cfg)
    assert split.classes == ("background", "liver", "spleen")
    assert len(split.test_images) == 6  # the last scan's 6 axial slices (identity affine: the third axis)
    # two training scans: labels are kept on whole scans, one of the two
    assert len(split.labelled_images) == 6 and len(split.unlabelled_images) == 6
    out = tmp_path / "run"
    assert finetune_main(["--task", str(images), "--label-dir", str(labels), "--image-size", "32", "--steps", "2",
                          "--batch-size", "2", "--unlabelled-batch-size", "2", "--out-dir", str(out)]) == 0
    assert set(json.loads((out / "result.json").read_text())["scores"]["student"]["per_class"]) == {"label_1",
                                                                                                    "label_4"}


def test_report_pairs_and_bootstrap(tmp_path):
    from tcm_mim.finetune.report import bootstrap_interval, parse_arm, write_report

    lo, hi = bootstrap_interval([0.1, 0.2, 0.3])
    assert 0.1 <= lo < 0.2 < hi <= 0.3
    assert bootstrap_interval([0.05, 0.05]) == (pytest.approx(0.05), pytest.approx(0.05))
    scores = {(0.1, "random"): {"none": [0.2, 0.3, 0.4], "mean_teacher": [0.25, 0.3, 0.5], "corn": [0.2, 0.4, 0.4]}}
    text = write_report(scores, tmp_path, title="t")
    assert "| 0.1 | random | 0.300 ± 0.100 | 0.350 ± 0.132 | 0.333 ± 0.115 |" in text
    assert "+0.050 +0.000 +0.100; +0.050 [" in text  # mean_teacher - none, per seed, then the mean
    assert json.loads((tmp_path / "results.json").read_text())["0.1|random"]["corn"] == [0.2, 0.4, 0.4]
    scores[(0.1, "random")]["corn_low_tau"] = [0.3, 0.3, 0.4]
    assert "corn_low_tau − mean_teacher" in write_report(scores, tmp_path, title="t")
    assert parse_arm("corn_low_tau:semi=corn,tau=0.3") == ("corn_low_tau", {"semi": "corn", "tau": 0.3})
    for bad in ("corn:tau=0.3", "x:tau=0.3", "x:semi=corn,nope=1", "x"):
        with pytest.raises(ValueError, match="arm"):
            parse_arm(bad)


def test_pretrained_encoder_is_loaded_weights_only(tmp_path):
    torch.manual_seed(0)
    model = SparKMIM(build_encoder("resnet_tiny"), decoder_width=16)
    path = checkpoint.save({"model": model.state_dict(), "config": {"encoder": "resnet_tiny", "dim": None}},
                           tmp_path / "checkpoint.pt")
    enc = load_pretrained_encoder(path, "resnet_tiny", 2)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[key], value)
    with pytest.raises(ValueError, match="holds a 2-D 'resnet_tiny' encoder"):
        load_pretrained_encoder(path, "resnet3d_tiny", 3)


@pytest.mark.parametrize("args, match", [
    (["--label-fraction", "0"], "label_fraction must be in"),
    (["--semi", "fixmatch"], "invalid choice"),
    (["--tau", "1.5"], "tau must be in"),
    (["--task", "/nonexistent"], "task must be 'chest_ct' or an existing folder"),
    (["--task", "/tmp"], "label_dir is required"),
    (["--device", "gpu0"], "device must be auto, cpu, cuda"),
    (["--image-size", "48"], "image_size must be a multiple of encoder 'resnet_tiny''s stride 32, got 48"),
    (["--checkpoint", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
])
def test_cli_errors(tmp_path, args, match, capsys):
    assert finetune_main([*args, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tcm-finetune: error:") and match in err and len(err.strip().splitlines()) == 1


def test_corn_step_wires_ccm_and_pool_to_the_teachers_confident_sites(tmp_path):
    from tcm_mim.finetune import FineTuner

    cfg = FinetuneConfig(semi="corn", image_size=64, steps=2, batch_size=2, unlabelled_batch_size=2, rampup_steps=0,
                         out_dir=str(tmp_path))
    ft = FineTuner(cfg)

    def sure_teacher():  # sure of "background" everywhere: every unlabelled site is confident class 0
        with torch.no_grad():
            ft.teacher.classifier.bias.copy_(torch.tensor([50.0] + [0.0] * (ft.num_classes - 1)))

    sure_teacher()
    row = ft.train_step()
    sites = 2 * (64 // ft.student.stem_stride) ** 2
    assert row["confident_rows"] == sites and row["pool_rows"] == sites
    assert row["ccm"] > 0  # labelled background rows meet the confident unlabelled rows
    assert row["dfp"] == 0.0  # the pool was empty before this step's push
    sure_teacher()  # the EMA update of step 0 made the teacher a copy of the student
    row = ft.train_step()
    assert row["dfp"] > 0 and row["pool_rows"] == 2 * sites
