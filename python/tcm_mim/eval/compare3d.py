"""The 3-D methods comparison on the embedded chest CT: the step count chosen from validation curves.

Every (method, seed) pretrains at one budget, then trains a probe (frozen encoder) and a fine-tune
(:func:`tcm_mim.eval.volume.train_volume_segmenter`) for ``probe_steps`` / ``finetune_steps``, recording
the mean Dice on the *validation* block (training side of the split, never the test block) every
``every`` steps and keeping a snapshot of the model there. Once every run is done, one step count per
mode is chosen from those curves by :func:`choose_step` — the same for every method — and only the
snapshots at that step are scored on the test block. The test block is therefore read once per run
and mode, after the choice, and never informs it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from ..models import build_encoder
from ..train import Trainer, load_config
from ..train.device import resolve_device
from .volume import (VolumeProtocol, VolumeSegmenter, VolumeTask, chest_organ_task_3d, score_volumes,
                     train_volume_segmenter)

MODES = ("probe", "finetune")
TOLERANCE = 0.01  # validation Dice within this of the best mean point counts as converged


def choose_step(curves: Sequence[Sequence[tuple[int, float]]], tolerance: float = TOLERANCE) -> int:
    """The step count for every method: the first recorded step at which the validation Dice averaged over
    all runs (every method and seed, one curve each, recorded at the same steps) is within ``tolerance`` of
    its best value; later points add less than ``tolerance`` on average, so training further is not worth it.
    """
    steps = [s for s, _ in curves[0]]
    if any([s for s, _ in c] != steps for c in curves):
        raise ValueError("choose_step: every curve must be recorded at the same steps")
    mean = np.mean([[v for _, v in c] for c in curves], axis=0)
    return int(steps[int(np.nonzero(mean >= mean.max() - tolerance)[0][0])])


def _present(volumes) -> list[int]:
    """Foreground class indices present in any of ``volumes``."""
    return sorted({int(c) for _, t in volumes for c in t.unique() if c > 0})


def _run(method: str, seed: int, steps: int, run_dir: pathlib.Path, overrides: Sequence[str], task, *,
         probe_steps: int, finetune_steps: int, every: int, protocol: VolumeProtocol, progress: bool) -> dict:
    """Pretrain (unless ``random``), train both modes with validation curves and snapshots; cached in
    ``run_dir/curves3d.json`` + ``snapshots3d.pt`` under a key of everything that determines them."""
    cfg = load_config(None, ["method=spark" if method == "random" else f"method={method}", f"seed={seed}",
                             f"steps={steps}", f"out_dir={run_dir}", "image_every=0", *overrides])
    key = {"config": dataclasses.asdict(cfg), "trained": method != "random", "probe_steps": probe_steps,
           "finetune_steps": finetune_steps, "every": every, "protocol": dataclasses.asdict(protocol)}
    done = run_dir / "curves3d.json"
    if done.exists() and json.loads(done.read_text())["key"] == key:
        print(f"{method} seed {seed}: reused {done}", flush=True)
        return json.loads(done.read_text())
    trainer = Trainer(cfg)
    if method != "random":  # random: the same architecture, initialised with the same seed, not trained
        trainer.train(progress=progress)
    record, snapshots = {"key": key, "curves": {}}, {}
    for mode in MODES:
        snapshots[mode] = {}
        _, record["curves"][mode] = train_volume_segmenter(
            trainer.model.encoder, task.train, len(task.classes), roi=cfg.image_size, mode=mode,
            steps=probe_steps if mode == "probe" else finetune_steps, protocol=protocol, seed=seed, val=task.val,
            every=every, snapshots=snapshots[mode])
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(snapshots, run_dir / "snapshots3d.pt")
    done.write_text(json.dumps(record, indent=1))
    print(f"{method} seed {seed}: validation curves {record['curves']}", flush=True)
    return record


def _test_scores(run_dir: pathlib.Path, record: dict, mode: str, step: int, task, protocol: VolumeProtocol) -> dict:
    """Per-class test Dice / HD95 of the snapshot of ``mode`` at ``step`` (cached in ``test3d.json``)."""
    path = run_dir / "test3d.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    name = f"{mode}@{step}"
    if name not in cache:
        cfg = record["key"]["config"]
        model = VolumeSegmenter(build_encoder(cfg["encoder"], dim=3, in_channels=1), len(task.classes),
                                protocol.width)
        state = torch.load(run_dir / "snapshots3d.pt", weights_only=True)[mode][step]
        model.load_state_dict(state)
        model.to(resolve_device(cfg["device"]))  # where the run trained (the config's device key)
        scores = score_volumes(model.eval(), task.test, task.classes, task.spacing, cfg["image_size"],
                               protocol.overlap)
        cache[name] = {"dice": scores.dice, "hd95": scores.hd95}
        path.write_text(json.dumps(cache, indent=1))
    return cache[name]


def run_volume_comparison(methods: Sequence[str], seeds: Sequence[int], steps: int, out: pathlib.Path,
                          overrides: Sequence[str], probe_steps: int, finetune_steps: int, *, every: int,
                          protocol: VolumeProtocol = VolumeProtocol(), progress: bool = True,
                          task: VolumeTask | None = None) -> dict:
    """Pretrain and evaluate every (method, seed) on the 3-D chest task; choose one step count per mode from
    the validation curves (:func:`choose_step`); score the snapshots at that step on the test block.

    Writes ``<out>/report.md`` / ``results.json`` / ``report.png`` (mean ± std, paired differences to
    ``random`` with bootstrap intervals), ``curves3d.json`` / ``curves3d.png`` (validation curves, per-class
    test Dice) and returns ``results`` (method -> [per seed {metric: value}]). ``task``: the embedded chest
    CT at 3-D (:func:`chest_organ_task_3d`, with its validation block) unless given."""
    from .report import write_report

    if every < 1:
        raise ValueError(f"run_volume_comparison: every must be >= 1 (validation curves choose the step), got {every}")
    task = task or chest_organ_task_3d()
    if not task.val:
        raise ValueError(f"run_volume_comparison: task {task.name!r} has no validation volumes to choose the step from")
    records = {m: [_run(m, s, steps, out / f"{m}_seed{s}", overrides, task, probe_steps=probe_steps,
                        finetune_steps=finetune_steps, every=every, protocol=protocol, progress=progress)
                   for s in seeds] for m in methods}
    chosen = {mode: choose_step([r["curves"][mode] for runs in records.values() for r in runs]) for mode in MODES}
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    per_class: dict[str, dict[str, list[list[float]]]] = {m: {mode: [] for mode in MODES} for m in methods}
    for method in methods:
        for seed, record in zip(seeds, records[method]):
            row = {}
            for mode in MODES:
                scores = _test_scores(out / f"{method}_seed{seed}", record, mode, chosen[mode], task, protocol)
                row[f"chest 3-D, {mode} (Dice)"] = float(np.nanmean(scores["dice"]))
                row[f"chest 3-D, {mode} (HD95 mm)"] = float(np.nanmean(scores["hd95"]))
                per_class[method][mode].append(scores["dice"])
            results[method].append(row)
    path = write_report(results, out, steps=steps, seeds=seeds,
                        title=f"3-D chest task: methods compared ({steps} pretraining steps, seeds {list(seeds)}, "
                              f"probe {chosen['probe']} / fine-tune {chosen['finetune']} steps chosen from the "
                              f"validation curves)")
    classes = task.classes[1:]
    lines = ["", "## Step counts chosen from the validation curves", "",
             f"Rule (`choose_step`, the same for every method): the first recorded step at which the validation "
             f"Dice averaged over every method and seed is within {TOLERANCE} of its best. Validation: "
             f"{sum(int((t >= 0).flatten(1).any(1).sum()) for _, t in task.val)} training-side slices below the test "
             f"block's guard band, predicted with as many slices of context below them "
             f"(classes present: {', '.join(classes[c - 1] for c in _present(task.val))}).",
             "", "| mode | chosen step | mean validation Dice at each recorded step |", "|---|---:|---|"]
    for mode in MODES:
        curves = [r["curves"][mode] for runs in records.values() for r in runs]
        mean = np.mean([[v for _, v in c] for c in curves], axis=0)
        lines.append(f"| {mode} | {chosen[mode]} | " + ", ".join(f"{s}: {v:.3f}" for (s, _), v in
                                                                  zip(curves[0], mean)) + " |")
    for mode in MODES:
        lines += ["", f"## Test Dice per class, {mode} (mean ± std over seeds)", "",
                  "| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for method in methods:
            vals = np.array(per_class[method][mode], dtype=float)
            cells = [f"{np.nanmean(vals[:, c]):.3f} ± {np.nanstd(vals[:, c], ddof=1) if len(vals) > 1 else 0:.3f}"
                     for c in range(len(classes))]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    (out / "curves3d.json").write_text(json.dumps({"chosen": chosen, "classes": classes, "per_class": per_class,
                                                   "curves": {m: [r["curves"] for r in runs]
                                                              for m, runs in records.items()}}, indent=1))
    _plot(records, chosen, per_class, classes, out / "curves3d.png")
    return results


def _plot(records, chosen, per_class, classes, path: pathlib.Path) -> None:
    """Validation curves (mean over seeds per method, the chosen step marked) and per-class test Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for ax, mode in zip(axes[:2], MODES):
        for method, runs in records.items():
            points = np.array([[v for _, v in r["curves"][mode]] for r in runs])
            ax.plot([s for s, _ in runs[0]["curves"][mode]], points.mean(0), marker=".", label=method)
        ax.axvline(chosen[mode], color="grey", linestyle="--")
        ax.set_title(f"{mode}: validation Dice (chosen step dashed)", fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    x = np.arange(len(classes))
    for ax, mode in zip(axes[2:], MODES):
        n = len(per_class)
        for i, (method, by_mode) in enumerate(per_class.items()):
            vals = np.array(by_mode[mode], dtype=float)
            ax.bar(x + (i - (n - 1) / 2) * 0.8 / n, np.nanmean(vals, 0), 0.8 / n, label=method,
                   yerr=np.nanstd(vals, 0), capsize=2)
        ax.set_xticks(x, classes, fontsize=8)
        ax.set_title(f"{mode} @ {chosen[mode]}: test Dice per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

