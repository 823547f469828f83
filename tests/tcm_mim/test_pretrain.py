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
