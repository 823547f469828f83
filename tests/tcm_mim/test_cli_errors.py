"""User errors of tcm-pretrain, tcm-eval and tcm-mask: one line on stderr, exit 2; bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tcm_mim.cli import mask
from tcm_mim.cli.common import run
from tcm_mim.eval.report import main as eval_main
from tcm_mim.train.checkpoint import RunLock
from tcm_mim.train.cli import main as pretrain_main


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("argv", "message"), [
    (["steps=0"], "config: steps must be >= 1, got 0"),
    (["lr=fast"], "config: lr must be a float, got 'fast'"),
    (["method=tcm", "prompts=[]"], "config: prompts must be a non-empty list"),
    (["--config", "/nonexistent/c.yaml"], "config: cannot read the config file /nonexistent/c.yaml"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate (see tcm-pretrain --help)"),
    (["--apply-config-changes"], "--apply-config-changes applies only with --resume"),
])
def test_pretrain_user_errors(capsys, argv, message):
    assert pretrain_main(argv) == 2
    assert message in _one_line(capsys, "tcm-pretrain")


def test_pretrain_refuses_a_locked_out_dir(tmp_path, capsys):
    with RunLock(tmp_path):
        assert pretrain_main(["--no-progress", "method=spark", "steps=1", "image_size=64", f"out_dir={tmp_path}"]) == 2
    assert f"out_dir {tmp_path} is in use by process {os.getpid()}" in _one_line(capsys, "tcm-pretrain")


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "/nonexistent/checkpoint.pt"], "checkpoint /nonexistent/checkpoint.pt does not exist"),
    (["--methods", "mae"], "--methods takes one of ('random', 'spark', 'tcm', 'anatomask', 'amlp') or NAME=CONFIG.yaml, got 'mae'"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--methods", "spark", "--no-progress", "steps=0"], "config: steps must be >= 1, got 0"),
    (["--methods", "spark", "--no-progress", "bogus=1"], "config: unknown key 'bogus'"),
])
def test_eval_user_errors(capsys, argv, message):
    assert eval_main(argv) == 2
    assert message in _one_line(capsys, "tcm-eval")


@pytest.mark.parametrize(("argv", "message"), [
    (["--mask-ratio", "1.5"], r"--mask-ratio must be in [0, 1), got 1.5"),
    (["--roi-mask-ratio", "-0.1"], r"--roi-mask-ratio must be in [0, 1], got -0.1"),
    (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
    (["--out", "mask.jpg"], "--out must be a .png file, got mask.jpg"),
    (["--out", "/nonexistent/mask.png"], "the folder /nonexistent does not exist"),
    (["--labels", "seg.nii.gz"], "--labels and --label-names go with --image"),
    (["--strategy", "random"], "argument --strategy: invalid choice: 'random'"),
])
def test_mask_validates_before_loading_anything(capsys, monkeypatch, argv, message):
    def never(*args, **kw):
        raise AssertionError("tcm-mask loaded data before validating its arguments")

    monkeypatch.setattr(mask, "load_embedded", never)
    monkeypatch.setattr(mask, "read_scan", never)
    base = {"--dataset": "chest_xray", "--prompt": "heart", "--out": "mask.png"}
    flags = dict(zip(argv[::2], argv[1::2]))
    args = [x for k, v in {**base, **flags}.items() for x in (k, v)]
    assert mask.main(args) == 2
    assert message in _one_line(capsys, "tcm-mask")


def test_mask_missing_image_file(capsys, tmp_path):
    assert mask.main(["--image", str(tmp_path / "scan.nii.gz"), "--prompt", "liver", "--out",
                      str(tmp_path / "o.png")]) == 2
    assert f"--image {tmp_path / 'scan.nii.gz'} does not exist" in _one_line(capsys, "tcm-mask")


def test_internal_errors_keep_their_traceback():
    def buggy(argv):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run("tcm-x", buggy, [])


def test_exit_status_of_the_installed_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "tcm_mim.train.cli", "checkpoint_every=0"], capture_output=True,
                            text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "tcm-pretrain: error: config: checkpoint_every must be >= 1, got 0\n"


def test_run_warnings_are_one_line_too(tmp_path, capsys):
    assert pretrain_main(["--no-progress", "--resume", "method=spark", "steps=1", "image_size=64", "batch_size=2",
                          "decoder_width=16", "image_every=0", f"out_dir={tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert f"tcm-pretrain: warning: --resume: no checkpoint at {tmp_path / 'checkpoint.pt'}; starting a fresh run\n" \
        in err
