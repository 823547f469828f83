"""The 3-D protocol: validation block on the training side, patch sampling, the step chosen from validation curves."""

from __future__ import annotations

import json

import pytest
import torch

from tcm_mim.data.split import GUARD
from tcm_mim.eval.tasks import chest_organ_volume

from .test_split import _blob_scans


def test_chest_3d_validation_block_is_on_the_training_side_with_guard_bands():
    from tcm_mim.eval.volume import VAL_SLICES, chest_organ_task_3d

    task = chest_organ_task_3d()
    volume, _, _, train, test = chest_organ_volume(144)
    val_lo = test[0] - GUARD - VAL_SLICES  # just below the test block's guard band
    (image, labels), = task.val  # the block with VAL_SLICES slices of context below it, labelled -1 (not scored)
    assert torch.equal(image, torch.from_numpy(volume[val_lo - VAL_SLICES:test[0] - GUARD]))
    assert (labels[:VAL_SLICES] == -1).all() and (labels[VAL_SLICES:] >= 0).all()
    assert torch.equal(task.test[0][0], torch.from_numpy(volume[test[0]:test[-1] + 1]))
    # training: below the validation block's own guard band, and above the test block's
    assert torch.equal(task.train[0][0], torch.from_numpy(volume[:val_lo - GUARD]))
    assert torch.equal(task.train[1][0], torch.from_numpy(volume[test[-1] + 1 + GUARD:]))
    assert sum(v.shape[0] for v, _ in task.train) == len(train) - VAL_SLICES - GUARD
    assert all((t >= 0).all() for _, t in task.train)  # the context's -1 marks stay in the validation volume
    assert {int(c) for c in labels.unique()} >= {-1, 0, 1, 3}  # lung and liver at least


def test_patch_sampler_is_seeded_pads_and_oversamples_foreground():
    from tcm_mim.eval.volume import _PatchSampler

    scans = _blob_scans(2)
    vols = [(torch.from_numpy(s.image).float(), torch.from_numpy(s.label_map).long()) for s in scans.values()]
    draw = [_PatchSampler(vols, 20, 1.0, torch.Generator().manual_seed(3)) for _ in range(2)]
    for _ in range(20):
        (a, ta), (b, tb) = draw[0](), draw[1]()
        assert a.shape == (20, 20, 20) and torch.equal(a, b) and torch.equal(ta, tb)  # depth 16 padded to 20
        assert (ta > 0).any()  # foreground=1: every patch is centred on a labelled voxel
    background = _PatchSampler(vols, 20, 0.0, torch.Generator().manual_seed(0))
    assert not all((background()[1] > 0).all() for _ in range(5))


def test_choose_step_is_the_first_within_tolerance_of_the_best_mean():
    from tcm_mim.eval.compare3d import choose_step

    curves = [[(10, 0.1), (20, 0.5), (30, 0.505)], [(10, 0.1), (20, 0.3), (30, 0.32)]]  # mean 0.1, 0.4, 0.4125
    assert choose_step(curves) == 30
    assert choose_step(curves, tolerance=0.02) == 20
    assert choose_step([[(10, 0.3), (20, 0.2)]]) == 10  # a falling curve: the best point comes first
    with pytest.raises(ValueError, match="same steps"):
        choose_step([[(10, 0.1)], [(20, 0.1)]])


def test_volume_comparison_chooses_from_validation_and_scores_only_the_chosen_step(tmp_path, monkeypatch):
    from tcm_mim.eval import volume
    from tcm_mim.eval.compare3d import run_volume_comparison
    from tcm_mim.eval.volume import VolumeProtocol, VolumeTask

    vols = [(torch.from_numpy(s.image / 600).float(), torch.from_numpy(s.label_map).long())
            for s in _blob_scans(4).values()]
    task = VolumeTask("blobs", ("background", "cube", "ball"), vols[:2], vols[3:], (1.0, 1.0, 1.0), vals := vols[2:3])
    curve_reads = []
    mean_dice = volume.mean_dice
    monkeypatch.setattr(volume, "mean_dice", lambda model, vs, *a, **k: curve_reads.append(vs) or mean_dice(
        model, vs, *a, **k))
    overrides = ["encoder=resnet3d_tiny", "image_size=16", "decoder_width=8", "batch_size=2", "warmup_steps=1",
                 "dataset=chest_ct"]
    args = dict(methods=["random", "spark"], seeds=[0, 1], steps=1, out=tmp_path, overrides=overrides,
                probe_steps=2, finetune_steps=3, every=1, protocol=VolumeProtocol(width=8), progress=False, task=task)
    results = run_volume_comparison(**args)
    assert curve_reads and all(vs is vals for vs in curve_reads)  # the curves never read the test volume
    saved = json.loads((tmp_path / "curves3d.json").read_text())
    chosen = saved["chosen"]
    assert chosen["probe"] in (1, 2) and chosen["finetune"] in (1, 2, 3)
    for run in ("random_seed0", "spark_seed1"):  # only the chosen snapshots were scored on the test volume
        assert set(json.loads((tmp_path / run / "test3d.json").read_text())) == {f"probe@{chosen['probe']}",
                                                                                 f"finetune@{chosen['finetune']}"}
    assert [len(results[m]) for m in ("random", "spark")] == [2, 2]
    report = (tmp_path / "report.md").read_text()
    assert "Paired differences to `random`" in report and "Test Dice per class, finetune" in report
    assert (tmp_path / "curves3d.png").exists()
    curve_reads.clear()
    assert run_volume_comparison(**args) == results and not curve_reads  # finished runs are reused


def test_validation_dice_scores_only_the_labelled_slices_of_a_context_volume():
    from torch import nn

    from tcm_mim.eval.volume import mean_dice

    target = torch.from_numpy(_blob_scans(1)["p0"].label_map[:, :16, :16]).long()

    class Oracle(nn.Module):  # outputs the labels, and class 1 everywhere in the first 4 (context) slices
        def forward(self, x):
            out = target.clone()
            out[:4] = 1
            return nn.functional.one_hot(out, 3).movedim(-1, 0)[None].float()

    context = target.clone()
    context[:4] = -1
    image = torch.zeros(1, *target.shape)[0]
    assert mean_dice(Oracle(), [(image, context)], 3, 16) == pytest.approx(1.0)
    assert mean_dice(Oracle(), [(image, target)], 3, 16) < 1  # scored there, the context slices would count
