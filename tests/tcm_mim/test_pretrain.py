"""tcm-pretrain: configuration, every method end to end for a few steps, exact resume."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from tcm_mim.data import Scan
from tcm_mim.train import PretrainConfig, Trainer, load_config
from tcm_mim.train.amlp import category_consistency_loss, ccl_targets
from tcm_mim.train.cli import main
from tcm_mim.train.stream import VolumeStream

TINY = dict(encoder="resnet_tiny", decoder_width=16, image_size=64, batch_size=2, steps=4, warmup_steps=2,
            checkpoint_every=2, image_every=0, dataset="chest_ct", prompts=["trachea"])  # one saliency; not scored
# resnet3d_tiny has 8-voxel patches: 24^3 crops are 3^3 = 27 patches, a step takes well under a second.
TINY3D = dict(encoder="resnet3d_tiny", decoder_width=8, image_size=24, batch_size=2, steps=4, warmup_steps=1,
              checkpoint_every=2, image_every=0, dataset="chest_ct", prompts=["trachea"])


def _losses(out_dir) -> list[tuple[int, str]]:
    with open(out_dir / "log.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: spark\nsteps: 7\nprompts: [heart]\n")
    cfg = load_config(path, ["lr=0.01", "prompts=left lung,heart", "backend=reference"])
    assert (cfg.method, cfg.steps, cfg.lr, cfg.prompts, cfg.backend) == ("spark", 7, 0.01, ["left lung", "heart"],
                                                                        "reference")
    assert cfg.ratio_at(0) == 0.6 and PretrainConfig(method="tcm").ratio_at(0) == 0.4
    ramp = PretrainConfig(method="amlp", steps=11)
    assert ramp.ratio_at(0) == pytest.approx(0.4) and ramp.ratio_at(10) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="unknown key .methd. .*did you mean method"):
        path.write_text("methd: spark\n")
        load_config(path)
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(None, ["method=mae"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])


@pytest.mark.parametrize(("method", "tiny"), [("spark", TINY), ("amlp", TINY3D)], ids=["spark-2d", "amlp-3d"])
def test_resume_continues_exactly(tmp_path, method, tiny):
    full = PretrainConfig(method=method, out_dir=str(tmp_path / "full"), **tiny)
    Trainer(full).train(progress=False)
    cut = PretrainConfig(method=method, out_dir=str(tmp_path / "cut"), **tiny)
    half = tiny["steps"] // 2
    Trainer(cut).train(progress=False, stop_after=half)
    assert len(_losses(tmp_path / "cut")) == half
    Trainer(cut).train(resume=True, progress=False)  # a new process would build a new Trainer too
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    if method == "amlp":  # the CCL column is logged, and resumed, like the other terms
        with open(tmp_path / "cut" / "log.csv") as f:
            assert all(float(r["ccl"]) > 0 for r in csv.DictReader(f))


@pytest.mark.parametrize("method", ["spark", "tcm", "anatomask", "amlp"])
def test_methods_run_and_write_outputs(tmp_path, method):
    cfg = PretrainConfig(method=method, out_dir=str(tmp_path), **{**TINY, "steps": 2, "image_every": 2})
    ckpt = Trainer(cfg).train(progress=False)
    assert ckpt.exists() and (tmp_path / "step000002.png").exists()
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(float(v)) for _, v in losses)


def test_dim_is_inferred_from_the_encoder_and_validated(tmp_path):
    assert PretrainConfig(encoder="resnet3d_tiny").spatial_dims == 3
    assert PretrainConfig(encoder="resnet_tiny").spatial_dims == 2
    assert PretrainConfig(encoder="convnext_tiny", dim=3).spatial_dims == 3  # any encoder may be built 3-D
    assert load_config(None, ["encoder=resnet_tiny", "dim=3"]).spatial_dims == 3
    with pytest.raises(ValueError, match="dim must be 2, 3 or null"):
        PretrainConfig(dim=4)
    with pytest.raises(ValueError, match="'resnet3d_tiny' is a 3-D encoder, but dim is 2"):
        load_config(None, ["encoder=resnet3d_tiny", "dim=2"])
    with pytest.raises(ValueError, match="amlp_ccl_blend must be in"):
        PretrainConfig(amlp_ccl_blend=1.5)
    with pytest.raises(ValueError, match="amlp_ccl_weight must be >= 0"):
        PretrainConfig(amlp_ccl_weight=-0.1)
    with pytest.raises(ValueError, match=r"3-D pretraining .* needs volumes, but dataset 'chest_xray' has 2-D"):
        Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY3D, "dataset": "chest_xray"}))
    with pytest.raises(ValueError, match="image_size 20 must be a multiple of the encoder's patch size 8"):
        Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY3D, "image_size": 20}))


def test_volume_stream_is_deterministic_and_keeps_saliency_aligned():
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(20, 30, 28, generator=gen).numpy()
    scan = Scan("v", "MR", volume, (1.0, 1.0, 1.0))
    # The saliency is the normalised image itself: after the shared crop, flips and rotation,
    # and no intensity change, the two outputs must still be equal voxel for voxel.
    stream = VolumeStream([scan], 16, saliency=lambda s, prompt: stream.images[s], prompts=["x"], intensity=0.0,
                          seed=3)
    image, saliency = stream.item(5)
    assert image.shape == saliency.shape == (1, 16, 16, 16)
    torch.testing.assert_close(image, saliency, rtol=0, atol=0)
    again, _ = VolumeStream([scan], 16, seed=3).item(5)  # a pure function of (seed, index): no state
    other, _ = VolumeStream([scan], 16, seed=3).item(6)
    assert not torch.equal(again, other)
    images, sal = VolumeStream([scan], 16, seed=3).batch(2, 3)
    assert images.shape == sal.shape == (3, 1, 16, 16, 16) and not sal.any()  # no saliency provider: zeros
    torch.testing.assert_close(images[2], VolumeStream([scan], 16, seed=3).item(8)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="every scan must be a 3-D volume"):
        VolumeStream([Scan("flat", "CR", np.zeros((8, 8), np.float32), (1.0, 1.0))], 4)
    with pytest.raises(ValueError, match="must not contain 2"):
        VolumeStream([scan], 16, flip_axes=(2,))


@pytest.mark.parametrize("method", ["spark", "tcm", "anatomask", "amlp"])
def test_methods_train_in_3d(tmp_path, method):
    """A few 3-D steps: finite logs, a central-slice PNG, and a lower loss on the first batch afterwards."""
    trainer = Trainer(PretrainConfig(method=method, out_dir=str(tmp_path), **{**TINY3D, "steps": 3, "image_every": 3}))
    assert trainer.dim == 3 and trainer.grid == (3, 3, 3)
    with torch.no_grad():
        before = trainer.compute_loss(0)
    trainer.train(progress=False)
    with torch.no_grad():
        after = trainer.compute_loss(0)
    # The reconstruction, which every method trains: tcm's InfoNCE over a batch of 2 crops starts near 0 (the two
    # views of one crop embed alike at initialisation) and 3 steps of reconstruction move it either way.
    assert float(after["recon"]) < float(before["recon"])
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(float(v)) for _, v in losses)
    from PIL import Image

    png = Image.open(tmp_path / "step000003.png")
    assert png.size == (3 * 24, 2 * 24)  # image | masked | reconstruction, one row per volume
    if method == "tcm":
        assert 0 < float(before["contrastive"]) and float(after["contrastive"]) != float(before["contrastive"])
    if method == "amlp":
        assert 0 < float(before["ccl"]) and float(after["ccl"]) < float(before["ccl"])


def test_ccl_matches_a_hand_computed_example():
    # lesion cluster c = [1, 0, 0, 1]; difficulty d = [4, 1, 3, 2]: median 2.5, hard h = [1, 0, 1, 0];
    # blend 0.5: targets (c + h) / 2 = [1, 0, 0.5, 0.5].
    lesion = torch.tensor([[True, False, False, True]])
    difficulty = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    targets = ccl_targets(lesion, difficulty, 0.5)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.5, 0.5]]), rtol=0, atol=0)
    torch.testing.assert_close(ccl_targets(lesion, difficulty, 0.0), lesion.float(), rtol=0, atol=0)
    # BCE(x, t) = log(1 + e^x) - t x on the visible patches 0, 1, 3 with logits 0, ln 3, ln 3:
    # ln 2 + ln 4 + (ln 4 - ln 3 / 2), averaged over 3.
    logits = torch.tensor([[0.0, math.log(3), 5.0, math.log(3)]])  # patch 2 is masked: its logit is ignored
    visible = torch.tensor([[True, True, False, True]])
    expected = (5 * math.log(2) - 0.5 * math.log(3)) / 3
    assert float(category_consistency_loss(logits, targets, visible)) == pytest.approx(expected, rel=1e-6)


def test_ccl_trains_its_head_and_the_encoder_and_is_in_the_amlp_loss(tmp_path):
    trainer = Trainer(PretrainConfig(method="amlp", out_dir=str(tmp_path), **TINY3D))
    losses = trainer.compute_loss(0)
    assert math.isfinite(losses["ccl"].item()) and losses["ccl"].item() > 0
    torch.testing.assert_close(losses["loss"], losses["recon"] + trainer.cfg.amlp_ccl_weight * losses["ccl"])
    losses["ccl"].backward()
    assert trainer.method.heads["ccl_head"].weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for p in trainer.model.encoder.parameters() if p.grad is not None]
    assert encoder_grads and sum(float(g.abs().sum()) for g in encoder_grads) > 0
    assert all(p.grad is None for p in trainer.model.decoder.parameters())  # CCL reads the encoder only
    # The head is in the optimiser, and with amlp_ccl_weight=0 the total loss leaves it untouched.
    head = trainer.method.heads["ccl_head"]
    assert any(p is head.weight for g in trainer.optimizer.param_groups for p in g["params"])
    off = Trainer(PretrainConfig(method="amlp", out_dir=str(tmp_path / "off"), **{**TINY3D, "amlp_ccl_weight": 0}))
    off.compute_loss(0)["loss"].backward()
    assert off.method.heads["ccl_head"].weight.grad is None or not off.method.heads["ccl_head"].weight.grad.any()


def test_cli(tmp_path, capsys):
    assert main(["--no-progress", "method=spark", f"out_dir={tmp_path}", *[f"{k}={v}" for k, v in TINY.items()],
                 "steps=2"]) == 0
    assert "checkpoint:" in capsys.readouterr().out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, method: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = PretrainConfig(method=method, out_dir=out_dir, **{**TINY, "steps": 2})
        trainer = Trainer(cfg)
        trainer.train(progress=False)
        torch.save(trainer.model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["tcm"])  # tcm exercises synced sparse BN and gathered InfoNCE negatives
def test_ddp_two_processes_gloo(tmp_path, method):
    """torchrun-style DDP on CPU: both ranks end with identical weights (averaged gradients, synced BN)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path), method), nprocs=2, join=True,
                       start_method="spawn")
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # Every parameter, and the encoder's sparse-BN running statistics (all-reduced), agree exactly.
    # The dense decoder's BatchNorm buffers are rank-local, as in any DDP model (DDP broadcasts
    # rank 0's before each forward; the checkpoint holds rank 0's), so they are not compared.
    keys = [k for k in a if not (k.startswith("decoder.") and "running_" in k or "num_batches" in k)]
    assert any(k.startswith("encoder.") and "running_mean" in k for k in keys)
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert len(_losses(tmp_path)) == 2  # rank 0 logged both steps


def test_folder_dataset_trains_tcm_with_its_own_labels(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        volume = rng.normal(100, 20, (12, 70, 70)).astype(np.float32)
        labels = np.zeros((12, 70, 70), np.int16)
        labels[:, 20:50, 10:40] = 1  # the "liver" block
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels" / f"{name}.nii.gz"))
    (tmp_path / "names.txt").write_text("1 liver\n")
    cfg = PretrainConfig(method="tcm", out_dir=str(tmp_path / "run"),
                         **{**TINY, "dataset": str(tmp_path / "images"), "prompts": ["liver"], "steps": 2},
                         label_dir=str(tmp_path / "labels"), label_names=str(tmp_path / "names.txt"))
    trainer = Trainer(cfg)
    images, saliency = trainer.stream.batch(0, 2)
    assert images.shape == (2, 1, 64, 64) and saliency.amax() > 0.5  # the prompt found the folder's label
    trainer.train(progress=False)
    assert all(math.isfinite(float(loss)) for _, loss in _losses(tmp_path / "run"))
    with pytest.raises(ValueError, match="dataset must be one of"):
        Trainer(PretrainConfig(method="spark", **{**TINY, "dataset": str(tmp_path / "missing")}))
