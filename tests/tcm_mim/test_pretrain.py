"""tcm-pretrain: configuration, every method end to end for a few steps, exact resume."""

from __future__ import annotations

import csv
import math

import pytest

from tcm_mim.train import PretrainConfig, Trainer, load_config
from tcm_mim.train.cli import main

TINY = dict(encoder="resnet_tiny", decoder_width=16, image_size=64, batch_size=2, steps=6, warmup_steps=2,
            checkpoint_every=3, image_every=0, dataset="chest_ct")


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
    with pytest.raises(ValueError, match="unknown keys"):
        path.write_text("methd: spark\n")
        load_config(path)
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(None, ["method=mae"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])


def test_resume_continues_exactly(tmp_path):
    full = PretrainConfig(method="spark", out_dir=str(tmp_path / "full"), **TINY)
    Trainer(full).train(progress=False)
    cut = PretrainConfig(method="spark", out_dir=str(tmp_path / "cut"), **TINY)
    Trainer(cut).train(progress=False, stop_after=3)
    assert len(_losses(tmp_path / "cut")) == 3
    Trainer(cut).train(resume=True, progress=False)  # a new process would build a new Trainer too
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


@pytest.mark.parametrize("method", ["spark", "tcm", "anatomask", "amlp"])
def test_methods_run_and_write_outputs(tmp_path, method):
    cfg = PretrainConfig(method=method, out_dir=str(tmp_path), **{**TINY, "steps": 2, "image_every": 2})
    ckpt = Trainer(cfg).train(progress=False)
    assert ckpt.exists() and (tmp_path / "step000002.png").exists()
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(float(v)) for _, v in losses)


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


@pytest.mark.parametrize("method", ["spark", "tcm"])
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
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert len(_losses(tmp_path)) == 2  # rank 0 logged both steps
