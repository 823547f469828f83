"""Checkpoint safety: digest, weights_only, clear errors, orphan temps, the out_dir lock, resume semantics."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from tcm_mim.train import PretrainConfig, Trainer, checkpoint
from tcm_mim.train.checkpoint import CheckpointError, RunLock, RunLockedError
from tcm_mim.train.config import ConfigError

# The smallest 2-D run of the pretraining tests: one 64^2 crop pair per step, 4 patches each.
TINY = dict(method="spark", encoder="resnet_tiny", decoder_width=16, image_size=64, batch_size=2, steps=2,
            warmup_steps=1, checkpoint_every=1, image_every=0, dataset="chest_ct")


class _WritesAFile:
    """Unpickling this calls ``Path.write_text``: what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def _state() -> dict:
    return {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "config": {"lr": 0.1}, "step": 3}


def test_round_trip_and_digest_file(tmp_path):
    path = checkpoint.save(_state(), tmp_path / "checkpoint.pt")
    line = (tmp_path / "checkpoint.pt.sha256").read_text()
    digest, name = line.split()
    assert name == "checkpoint.pt" and len(digest) == 64 and line.endswith("\n")  # sha256sum -c reads it
    assert checkpoint.verify(path)
    state = checkpoint.load(path)
    torch.testing.assert_close(state["model"]["w"], _state()["model"]["w"], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]  # no temp left


def test_flipped_bytes_inside_a_tensor_are_caught(tmp_path):
    path = checkpoint.save(_state(), tmp_path / "checkpoint.pt")
    data = bytearray(path.read_bytes())
    at = data.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4064])
    assert at > 0
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt is corrupt: its SHA-256 .* differs from "
                                              r".* recorded in checkpoint.pt.sha256"):
        checkpoint.load(path)
    # Without the digest the same file loads silently: what the digest is for.
    (tmp_path / "checkpoint.pt.sha256").unlink()
    with pytest.warns(UserWarning, match="has no digest file checkpoint.pt.sha256"):
        state = checkpoint.load(path)
    assert not torch.equal(state["model"]["w"], _state()["model"]["w"])


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = checkpoint.save({**_state(), "payload": _WritesAFile(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint .* refused: it contains a pickled Python object "
                                              r"\(.*\), which could run code"):
        checkpoint.load(path)
    assert not marker.exists()
    # tcm-eval --checkpoint: the same refusal, one line on stderr, exit 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "tcm_mim.eval.report", "--checkpoint", str(path), "--out",
                             str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tcm-eval: error: checkpoint ") and "refused" in result.stderr
    assert result.stderr.count("\n") == 1 and not marker.exists()


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "is not a readable checkpoint (truncated, or not written by torch.save)"),
    ("empty", "is not a readable checkpoint"),
    ("no_model", "lacks ['model']: not a tcm-pretrain checkpoint"),
    ("missing", "does not exist"),
])
def test_load_errors_name_the_file_and_the_problem(tmp_path, damage, message):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(), path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no_model":
        checkpoint.save({"config": {}}, path)
    else:
        path.unlink()
    if damage in ("truncate", "empty"):  # past the digest check, to reach torch.load's own failure
        (tmp_path / "checkpoint.pt.sha256").unlink()
    with pytest.raises(CheckpointError) as err:
        with pytest.warns(UserWarning) if damage in ("truncate", "empty") else contextlib.nullcontext():
            checkpoint.load(path)
    assert str(err.value).startswith(f"checkpoint {path}") and message in str(err.value)


def test_nonfinite_state_is_not_written_and_the_last_good_checkpoint_stays(tmp_path):
    path = checkpoint.save(_state(), tmp_path / "checkpoint.pt")
    good = path.read_bytes()
    bad = _state()
    bad["model"]["w"][7] = float("nan")
    with pytest.raises(CheckpointError, match=r"not written: tensor 'model.w' has NaN or inf values"):
        checkpoint.save(bad, path)
    assert path.read_bytes() == good and checkpoint.verify(path)


def test_orphan_temps_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.4242.tmp").write_bytes(b"half")
    (tmp_path / ".checkpoint.pt.sha256.4242.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours")
    removed = checkpoint.remove_orphan_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.4242.tmp", ".checkpoint.pt.sha256.4242.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock(tmp_path):
    with RunLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(RunLockedError, match=rf"out_dir {tmp_path} is in use by process {os.getpid()} on "
                                                 rf"{socket.gethostname()} \(started .*\); .*delete .*run.lock"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "run.lock").exists()
    # a lock left by a dead process on this host is taken over, with a warning
    (tmp_path / "run.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                   "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    # another host's lock cannot be checked: refused
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "other-node", "started": "x"}))
    with pytest.raises(RunLockedError, match="in use by process 1 on other-node"):
        RunLock(tmp_path).acquire()


def test_a_second_run_on_the_same_out_dir_is_refused_before_touching_it(tmp_path):
    (tmp_path / "log.csv").write_text("the other run's log\n")
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="is in use by process"):
            Trainer(PretrainConfig(out_dir=str(tmp_path), **TINY)).train(progress=False)
    assert (tmp_path / "log.csv").read_text() == "the other run's log\n"


def test_log_is_flushed_at_every_checkpoint(tmp_path, monkeypatch):
    seen = []
    save = checkpoint.save

    def spy(state, path):
        with open(tmp_path / "log.csv") as f:  # what a kill right now would leave on disk
            seen.append((state["step"], len(list(csv.DictReader(f)))))
        return save(state, path)

    monkeypatch.setattr(checkpoint, "save", spy)
    Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "log_every": 100})).train(progress=False)
    assert seen == [(1, 1), (2, 2)]


def test_resume_refuses_a_changed_lr_and_applies_it_with_the_flag(tmp_path):
    cfg = PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 3})
    Trainer(cfg).train(progress=False, stop_after=1)
    (tmp_path / ".checkpoint.pt.999999.tmp").write_bytes(b"killed during a save")
    changed = PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 3, "lr": 1e-3, "batch_size": 4})
    with pytest.raises(ConfigError, match=r"--resume: the config differs from .*checkpoint.pt's in keys that change "
                                          r"the run: batch_size 2 -> 4, lr 0.002 -> 0.001; pass "
                                          r"--apply-config-changes"):
        Trainer(changed).train(resume=True, progress=False)
    assert not (tmp_path / ".checkpoint.pt.999999.tmp").exists()  # orphans go once the lock is held

    trainer = Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 3, "lr": 1e-3}))
    trainer.train(resume=True, apply_changes=True, progress=False, stop_after=0)
    factor = trainer._lr_factor(1)
    assert trainer.step == 1 and factor > 0
    for group in trainer.optimizer.param_groups:  # the optimiser really runs at the new rate
        assert group["initial_lr"] == 1e-3 and group["lr"] == pytest.approx(1e-3 * factor)
    assert trainer.scheduler.base_lrs == [1e-3] * len(trainer.optimizer.param_groups)
    trainer.train(resume=True, apply_changes=True, progress=False)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert float(rows[0]["lr"]) == pytest.approx(2e-3 * trainer._lr_factor(1), rel=1e-5)  # before the change
    assert float(rows[1]["lr"]) == pytest.approx(1e-3 * trainer._lr_factor(2), rel=1e-5)  # after: 0.5 * 1e-3
    assert checkpoint.load(tmp_path / "checkpoint.pt")["config"]["lr"] == 1e-3


def test_resume_may_grow_steps_but_never_change_the_model(tmp_path):
    Trainer(PretrainConfig(out_dir=str(tmp_path), **TINY)).train(progress=False)
    grown = Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 3, "log_every": 5}))
    grown.train(resume=True, progress=False)
    assert grown.step == 3
    with pytest.raises(ConfigError, match=r"was trained with method 'spark' -> 'anatomask'; these keys cannot change"):
        Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 3, "method": "anatomask"})).train(
            resume=True, apply_changes=True, progress=False)


def test_resume_without_a_checkpoint_says_so_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match=r"--resume: no checkpoint at .*checkpoint.pt; starting a fresh run"):
        trainer = Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 1}))
        trainer.train(resume=True, progress=False)
    assert trainer.step == 1 and checkpoint.verify(tmp_path / "checkpoint.pt")


def test_a_checkpoint_written_before_digests_still_resumes(tmp_path):
    trainer = Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 2}))
    trainer.train(progress=False, stop_after=1)
    torch.save(trainer.state_dict(), tmp_path / "checkpoint.pt")  # how checkpoints were written until now
    (tmp_path / "checkpoint.pt.sha256").unlink()
    with pytest.warns(UserWarning, match="has no digest file"):
        resumed = Trainer(PretrainConfig(out_dir=str(tmp_path), **{**TINY, "steps": 2}))
        resumed.train(resume=True, progress=False)
    assert resumed.step == 2 and checkpoint.verify(tmp_path / "checkpoint.pt")


def test_eval_loads_the_encoder_of_a_checkpoint_safely(tmp_path):
    from tcm_mim.eval.report import _encoder_from_checkpoint

    trainer = Trainer(PretrainConfig(out_dir=str(tmp_path / "2d"), **{**TINY, "steps": 1}))
    path = trainer.train(progress=False)
    encoder, cfg = _encoder_from_checkpoint(path)
    assert cfg.spatial_dims == 2
    for (name, a), b in zip(encoder.state_dict().items(), trainer.model.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    state = checkpoint.load(path)
    state["config"]["decoder_width"] = 8  # weights that do not fit the config they carry
    checkpoint.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd.pt: its weights do not fit the model its config describes"):
        _encoder_from_checkpoint(tmp_path / "odd.pt")
    state["config"].update(decoder_width=16, encoder="resnet3d_tiny", image_size=24)
    checkpoint.save(state, tmp_path / "3d.pt")
    with pytest.raises(CheckpointError, match=r"3d.pt: its weights do not fit"):  # 3-D encoders load as 3-D
        _encoder_from_checkpoint(tmp_path / "3d.pt")


def test_resume_from_a_checkpoint_that_does_not_fit_names_it(tmp_path):
    trainer = Trainer(PretrainConfig(out_dir=str(tmp_path), **TINY))
    trainer.train(progress=False, stop_after=1)
    good = checkpoint.load(tmp_path / "checkpoint.pt")
    state = {**good, "model": {k: v for k, v in good["model"].items() if k != "mask_tokens.0"}}
    checkpoint.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint.pt does not fit this run: RuntimeError: "
                                              r"Error\(s\) in loading state_dict .*Missing key.*mask_tokens.0"):
        Trainer(PretrainConfig(out_dir=str(tmp_path), **TINY)).train(resume=True, progress=False)
    checkpoint.save({k: v for k, v in good.items() if k != "torch_rng"}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"does not fit this run: KeyError"):
        Trainer(PretrainConfig(out_dir=str(tmp_path), **TINY)).train(resume=True, progress=False)


def test_every_torch_load_in_the_package_is_weights_only():
    import ast

    root = pathlib.Path(__file__).resolve().parents[2]
    calls = []
    for path in [*(root / "python").rglob("*.py"), *(root / "tcm_kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", safe))
    assert any("train/checkpoint.py" in where for where, _ in calls)  # the scan finds the loader itself
    assert [where for where, safe in calls if not safe] == []
