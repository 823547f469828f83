"""``tcm-eval``: pretrain every method at the same budget over several seeds, evaluate, report.

    tcm-eval --methods spark tcm anatomask amlp random --seeds 0 1 2 --steps 300 --out runs/eval
    tcm-eval --checkpoint runs/pretrain_tcm/checkpoint.pt     # evaluate one pretrained model

    tcm-eval --checkpoint runs/pretrain/checkpoint.pt --dataset my_ct/ --label-dir my_ct_labels/ \
             --task segmentation --folds 3 --label-fraction 0.1 1.0 --seeds 0 1 2

With --dataset (a folder with a label folder, as tcm-pretrain reads it, or a corpus written by
tcm-prepare) the split is by scan: only labelled scans that the checkpoint's pretraining never
read (<checkpoint dir>/split.json) are test scans, in --folds folds chosen from --split-seed; the
training scans are all other labelled scans, of which --label-fraction keeps a share.

Writes <out>/report.md (mean ± std per method and task) and <out>/report.png. Whatever
the numbers say is the result: every method gets the same encoder, data, steps and
evaluation; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence

import numpy as np
import torch

from ..cli.common import ArgumentParser, run
from ..data import PreparedCorpus, normalize_intensity, prepare_corpus
from ..data import load_embedded
from ..data.split import SCORED, SPLIT_FILE, SplitManifest, embedded_split, label_subset
from ..data.split import folds as split_folds
from ..errors import UserError
from ..models import SparKMIM, build_encoder
from ..train import PretrainConfig, Trainer, checkpoint, load_config
from ..train.config import METHODS, ConfigError, config_from_dict
from .probe import evaluate_encoder, learning_curve
from .compare3d import run_volume_comparison
from .tasks import brain_lobe_task, chest_organ_task, scan_task, with_label_fraction
from .volume import VolumeTask, chest_organ_task_3d, evaluate_volume_task

EVALS = (("chest organs, probe (Dice)", "chest", "probe"), ("chest organs, fine-tune (Dice)", "chest", "finetune"),
         ("brain lobes, probe (acc.)", "brain", "probe"))
SMOOTH = 3  # points of the moving average the step rule reads a validation curve through
TOLERANCE = 0.01  # the step rule: the first step within 1 % (relative) of the smoothed curve's maximum


def eval_label(label: str, fraction: float) -> str:
    """The score name of an evaluation at a label fraction ("chest organs, fine-tune, 10% labels (Dice)")."""
    if fraction == 1.0:
        return label
    head, metric = label.rsplit(" (", 1)
    return f"{head}, {100 * fraction:g}% labels ({metric}"


def evaluate(encoder, tasks, *, probe_steps: int, finetune_steps: int, seed: int, dim: int = 2,
             roi: int = 48, curve_every: int = 0, curves: dict | None = None, fraction: float = 1.0
             ) -> dict[str, float]:
    """The embedded tasks' scores: 2-D encoders on the chest and brain tasks, 3-D encoders on the chest
    CT at 3-D (``roi``-sided patches, the pretraining crop, and sliding-window inference).

    ``fraction`` < 1 (2-D): the chest task keeps the labels of that share of its training slices
    (:func:`with_label_fraction`); the brain probe is scored at 1.0 only. ``curve_every`` > 0 (2-D):
    ``curves[label]`` receives the learning curve [{"step", "validation", "test"}] of each evaluation,
    whose last point is its score (the same runs, no extra training)."""
    out = {}
    if dim == 3:
        for mode in ("probe", "finetune"):
            steps = probe_steps if mode == "probe" else finetune_steps
            scores = evaluate_volume_task(encoder, tasks["chest3d"], roi=roi, mode=mode, steps=steps, seed=seed)
            out[f"chest 3-D, {mode} (Dice)"] = scores.mean_dice
            out[f"chest 3-D, {mode} (HD95 mm)"] = float(np.nanmean(scores.hd95))
        return out
    for label, task_key, mode in EVALS:
        if task_key == "brain" and fraction != 1.0:
            continue
        steps = probe_steps if mode == "probe" else finetune_steps
        task = with_label_fraction(tasks[task_key], fraction, seed) if task_key == "chest" else tasks[task_key]
        curve = learning_curve(encoder, task, mode=mode, steps=steps, every=curve_every or steps, seed=seed)
        out[eval_label(label, fraction)] = curve[-1]["test"]
        if curves is not None and curve_every:
            curves[eval_label(label, fraction)] = curve
    return out


def converged_step(curve: Sequence[tuple[int, float]], *, smooth: int = SMOOTH, tolerance: float = TOLERANCE) -> int:
    """The step rule on one validation curve [(step, metric)]: the first step at which the moving average
    over ``smooth`` points (trailing, fewer at the start) is within ``tolerance`` (relative) of its maximum."""
    steps = [s for s, _ in curve]
    values = np.array([v for _, v in curve], dtype=np.float64)
    smoothed = np.array([values[max(0, i - smooth + 1):i + 1].mean() for i in range(len(values))])
    return steps[int(np.argmax(smoothed >= (1 - tolerance) * smoothed.max()))]


def choose_steps(curves: dict[str, list[dict[str, list[dict]]]]) -> dict[str, dict]:
    """One step count per evaluation for every method, from the VALIDATION curves only (the test values are
    never read): per method the mean validation curve over seeds, :func:`converged_step` of each, and the
    maximum over methods. ``curves``: method -> [per seed {label: [{"step", "validation", "test"}]}].
    Returns {label: {"steps": chosen, "per_method": {method: step}, "budget": last curve step}}."""
    chosen = {}
    for label in next(iter(curves.values()))[0]:
        per_method = {}
        for method, runs in curves.items():
            points = [run[label] for run in runs]
            if any(p["validation"] is None for run in points for p in run):
                raise ValueError(f"choose_steps: {method} {label!r} has no validation curve: the task needs a "
                                 f"validation split to choose a step count from")
            mean = np.mean([[p["validation"] for p in run] for run in points], axis=0)
            per_method[method] = converged_step(list(zip([p["step"] for p in points[0]], mean)))
        chosen[label] = {"steps": max(per_method.values()), "per_method": per_method,
                         "budget": next(iter(curves.values()))[0][label][-1]["step"]}
    return chosen


def scores_at(curves: dict[str, list[dict[str, list[dict]]]], chosen: dict[str, dict]
              ) -> dict[str, list[dict[str, float]]]:
    """method -> [per seed {label: test metric at the chosen step}] (the model of a run of that many steps)."""
    return {method: [{label: next(p["test"] for p in run[label] if p["step"] == chosen[label]["steps"])
                      for label in run} for run in runs] for method, runs in curves.items()}


def plot_curves(curves: dict[str, list[dict[str, list]]], path: pathlib.Path, chosen: dict | None = None) -> None:
    """``curves``: method -> [per seed {label: [{"step", "validation", "test"}]}]; one panel per label,
    the validation metric (the test metric where a task has no validation split), mean over seeds; the
    chosen step count as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(next(iter(curves.values()))[0])
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        split = "validation" if next(iter(curves.values()))[0][label][0]["validation"] is not None else "test"
        for method, runs in curves.items():
            points = np.array([[p[split] for p in run[label]] for run in runs])
            ax.plot([p["step"] for p in runs[0][label]], points.mean(0), label=method)
        if chosen and label in chosen:
            ax.axvline(chosen[label]["steps"], color="k", ls="--", lw=0.8)
        ax.set_title(f"{label}\n{split}", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_curves_csv(curves: dict[str, list[dict[str, list]]], path: pathlib.Path, seeds: Sequence[int]) -> None:
    """One row per (method, seed, evaluation, step): validation and test metric."""
    lines = ["method,seed,evaluation,step,validation,test"]
    for method, runs in curves.items():
        for seed, run in zip(seeds, runs):
            for label, curve in run.items():
                for p in curve:
                    val = "" if p["validation"] is None else f"{p['validation']:.6f}"
                    lines.append(f'{method},{seed},"{label}",{p["step"]},{val},{p["test"]:.6f}')
    path.write_text("\n".join(lines) + "\n")


def embedded_tasks(dim: int, *, validation: bool = False) -> dict:
    """The embedded tasks a ``dim``-D encoder is evaluated on (split as pretraining on them is);
    ``validation``: the 2-D tasks hold out a validation split of their training side."""
    return {"chest3d": chest_organ_task_3d()} if dim == 3 else \
        {"chest": chest_organ_task(validation=validation), "brain": brain_lobe_task(validation=validation)}


def _encoder_from_checkpoint(path: pathlib.Path):
    """(pretrained sparse encoder, its config) of a tcm-pretrain checkpoint (verified, weights_only=True)."""
    state = checkpoint.load(path, required=("model", "config"))
    cfg = config_from_dict(state["config"], source=str(path))
    dim = cfg.spatial_dims
    model = SparKMIM(build_encoder(cfg.encoder, dim=dim, in_channels=1, drop_path=cfg.drop_path), dim=dim,
                     in_channels=1, decoder_width=cfg.decoder_width, decoder=cfg.decoder)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # missing / unexpected keys or shapes: the file does not match its config
        raise checkpoint.CheckpointError(f"checkpoint {path}: its weights do not fit the model its config "
                                         f"describes: {str(err).splitlines()[0]}") from None
    return model.encoder, cfg


def parse_run(spec: str) -> tuple[str, str | None, str]:
    """``METHOD`` or ``NAME=CONFIG.yaml`` (e.g. ``spark_paper=configs/spark_paper.yaml``) -> (row name,
    config file or None, method); ``random`` is the untrained encoder."""
    name, sep, path = spec.partition("=")
    if sep:
        if not name or not pathlib.Path(path).is_file():
            raise UserError(f"tcm-eval: --methods NAME=CONFIG needs a name and an existing config file, got {spec!r}")
        return name, path, load_config(path, []).method
    if name not in ("random", *METHODS):
        raise UserError(f"tcm-eval: --methods takes one of {('random', *METHODS)} or NAME=CONFIG.yaml, got {spec!r}")
    return name, None, "spark" if name == "random" else name


def run_config(spec: str, seed: int, steps: int, run_dir: pathlib.Path, overrides: Sequence[str]) -> PretrainConfig:
    """The pretraining config of one (``spec``, seed) run: the method's defaults or the named config file,
    then the comparison's budget and ``overrides`` (the same for every run)."""
    name, path, method = parse_run(spec)
    return load_config(path, [f"method={method}", f"seed={seed}", f"steps={steps}", f"out_dir={run_dir}",
                              "image_every=0", *overrides])


def run_comparison(methods, seeds, steps, out: pathlib.Path, overrides, probe_steps, finetune_steps, progress=True,
                   curve_every: int = 0, fractions: Sequence[float] = (1.0,), select_steps: bool = False):
    """Pretrain and evaluate every (method, seed) at every label fraction (the fraction is the outer loop, so
    an interrupted grid has every method at the first fractions). A run whose recorded key (configuration,
    evaluation budget, fraction) matches is reused, and pretraining resumes from its checkpoint, so an
    interrupted comparison continues. ``methods``: :func:`parse_run` specs.

    ``curve_every`` > 0: learning curves of every evaluation (validation and test) in ``<out>/curves.png``,
    ``curves.csv``, ``curves.json``. ``select_steps``: the probe / fine-tune step counts are budgets; one step
    count per evaluation is chosen for every method from the validation curves (:func:`choose_steps`) and
    each run's score is its test metric at that step (``<out>/steps.json``)."""
    if select_steps and not curve_every:
        raise UserError("tcm-eval: --select-steps chooses the step count from learning curves; give --curve-every")
    names = [parse_run(m)[0] for m in methods]
    if len(set(names)) != len(names):
        raise UserError(f"tcm-eval: --methods names must be distinct, got {names}")
    dims = {run_config(m, 0, steps, out, overrides).spatial_dims for m in methods}
    if len(dims) != 1:
        raise UserError(f"tcm-eval: every run of a comparison must have the same spatial dims, got {sorted(dims)}")
    dim = dims.pop()
    if dim == 3:  # the step counts are chosen from validation curves: docs/evaluation.md, 3-D
        return run_volume_comparison(methods, seeds, steps, out, overrides, probe_steps, finetune_steps,
                                     every=curve_every or max(1, max(probe_steps, finetune_steps) // 8),
                                     progress=progress)
    tasks = embedded_tasks(dim, validation=select_steps)
    results: dict[str, list[dict[str, float]]] = {n: [{} for _ in seeds] for n in names}
    curves: dict[str, list[dict[str, list]]] = {n: [{} for _ in seeds] for n in names}
    for fraction in fractions:
        for spec, name in zip(methods, names):
            for i, seed in enumerate(seeds):
                run_dir = out / f"{name}_seed{seed}"
                cfg = run_config(spec, seed, steps, run_dir, overrides)
                key = {"config": dataclasses.asdict(cfg), "trained": name != "random", "probe_steps": probe_steps,
                       "finetune_steps": finetune_steps, **({"curve_every": curve_every} if curve_every else {}),
                       **({"label_fraction": fraction, "validation": select_steps} if fraction != 1.0 or
                          select_steps else {})}
                done = run_dir / ("eval.json" if fraction == 1.0 else f"eval_labels{fraction:g}.json")
                if done.exists() and _with_defaults(json.loads(done.read_text())["key"]) == key:
                    recorded = json.loads(done.read_text())
                    results[name][i].update(recorded["scores"])
                    curves[name][i].update(recorded.get("curves", {}))
                    print(f"{name} seed {seed} labels {fraction:g}: reused {done}", flush=True)
                    continue
                trainer = Trainer(cfg)
                if name != "random":  # random: the same architecture, initialised with the same seed, not trained
                    try:  # a finished pretraining of this config is read back, an interrupted one continued
                        trainer.train(resume=True, progress=progress)
                    except ConfigError:  # the folder holds another config's pretraining: start this one afresh
                        trainer = Trainer(cfg)
                        trainer.train(progress=progress)
                run_curves: dict[str, list] = {}
                scores = evaluate(trainer.model.encoder, tasks, probe_steps=probe_steps,
                                  finetune_steps=finetune_steps, seed=seed, dim=dim, roi=cfg.image_size,
                                  curve_every=curve_every, curves=run_curves, fraction=fraction)
                results[name][i].update(scores)
                curves[name][i].update(run_curves)
                run_dir.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps({"key": key, "scores": scores, "curves": run_curves}, indent=1))
                print(f"{name} seed {seed} labels {fraction:g}: {scores}", flush=True)
    chosen = None
    if select_steps and dim == 2:
        chosen = choose_steps(curves)
        results = scores_at(curves, chosen)
        (out / "steps.json").write_text(json.dumps(chosen, indent=1))
    references = [r for r in ("random", "spark") if r in results]
    write_report(results, out, steps=steps, seeds=seeds, references=references,
                 notes=_steps_note(chosen) if chosen else None)
    if curve_every and dim == 2:
        (out / "curves.json").write_text(json.dumps(curves, indent=1))
        write_curves_csv(curves, out / "curves.csv", seeds)
        plot_curves(curves, out / "curves.png", chosen)
    return results


def _steps_note(chosen: dict[str, dict]) -> list[str]:
    lines = ["## Step counts chosen from the validation curves", "",
             f"Rule: per method, the validation metric averaged over seeds, smoothed by a trailing mean of {SMOOTH} "
             f"points; its first step within {100 * TOLERANCE:g} % of its maximum; the step count is the maximum "
             f"over methods, the same for every method. Test scores are read at that step (the run's model after "
             f"that many steps: constant learning rate, evaluation without gradients).", "",
             "| evaluation | chosen steps | budget | per method |", "|---|---:|---:|---|"]
    for label, c in chosen.items():
        per = ", ".join(f"{m} {s}" for m, s in c["per_method"].items())
        flag = " (the budget's end: the curve may not have converged)" if c["steps"] == c["budget"] else ""
        lines.append(f"| {label} | {c['steps']}{flag} | {c['budget']} | {per} |")
    return lines


def _with_defaults(key: dict) -> dict:
    """A recorded run key with config fields added since it was written set to their defaults (a
    run recorded before a field existed ran with the behaviour its default keeps)."""
    defaults = dataclasses.asdict(PretrainConfig())
    return {**key, "config": {**{k: v for k, v in defaults.items() if k not in key["config"]}, **key["config"]}}


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (paired per-seed differences)."""
    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def paired_differences(results: dict[str, list[dict[str, float]]], reference: str) -> list[str]:
    """Markdown lines: per metric and row, the mean of the paired per-seed differences to ``reference``
    with its 95% bootstrap interval, and plainly whether the interval holds 0 (no resolved difference)."""
    ref = results[reference]
    lines = [f"## Paired differences to `{reference}` (per seed, 95% bootstrap interval)", "",
             "| row | metric | mean difference | 95% interval | resolved? |", "|---|---|---:|---|---|"]
    widths: dict[str, list[float]] = {}
    for row, runs in results.items():
        if row == reference:
            continue
        if len(runs) != len(ref):
            raise ValueError(f"paired_differences: {row!r} has {len(runs)} seeds, {reference!r} {len(ref)}: "
                             f"differences pair seeds, so both need the same seeds")
        for label in runs[0]:
            diffs = [r[label] - q[label] for r, q in zip(runs, ref)]
            lo, hi = bootstrap_interval(diffs)
            verdict = "no: the interval holds 0" if lo <= 0 <= hi else "yes"
            lines.append(f"| {row} | {label} | {statistics.fmean(diffs):+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                         f"{verdict} |")
            widths.setdefault(label, []).append((hi - lo) / 2)
    lines.append("")
    lines.append("Smallest difference resolved (the median half-width of the intervals above, per metric: a "
                 "paired difference smaller than this is typically inside its interval): " +
                 "; ".join(f"{label} {statistics.median(w):.3f}" for label, w in widths.items()) + ".")
    lines.append("")
    lines.append(f"Seeds: {len(ref)}. With few seeds the bootstrap interval is coarse (it resamples only "
                 f"{len(ref)} differences); read it as a lower bound on the uncertainty.")
    return lines


def write_report(results, out: pathlib.Path, *, steps: int | None, seeds, title: str | None = None,
                 reference: str | None = None, references: Sequence[str] | None = None,
                 notes: Sequence[str] | None = None) -> pathlib.Path:
    """``<out>/report.md`` (mean ± std per row and metric, paired differences to each of ``references``
    (default: ``[reference]``, or ``random`` when there is such a row), then ``notes``), ``results.json``
    and ``report.png``; ``results``: row -> [per seed {metric: value}]."""
    labels = list(next(iter(results.values()))[0])
    title = title or f"Pretraining methods compared ({steps} steps each, seeds {list(seeds)})"
    lines = [f"# {title}", "",
             "| method | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    summary = {}
    for method, runs in results.items():
        cells = []
        for label in labels:
            vals = [r[label] for r in runs]
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary.setdefault(label, {})[method] = (mean, std)
            cells.append(f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if references is None:
        reference = reference if reference is not None else ("random" if "random" in results else None)
        references = [reference] if reference is not None else []
    for ref in references:
        if len(results) > 1 and len(results[ref]) > 1:
            lines += ["", *paired_differences(results, ref)]
    if notes:
        lines += ["", *notes]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(summary, out / "report.png")
    return path


def _plot(summary, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(4 * len(summary), 3), squeeze=False)
    for ax, (label, by_method) in zip(axes[0], summary.items()):
        names = list(by_method)
        ax.bar(names, [by_method[m][0] for m in names], yerr=[by_method[m][1] for m in names], capsize=3)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _dataset_corpus(dataset: str, label_dir: str | None, label_names: str | None, out: pathlib.Path):
    """A prepared corpus of ``dataset`` (used as it is) or of a folder (prepared into ``<out>/corpus``)."""
    if PreparedCorpus.is_corpus(dataset):
        return PreparedCorpus(dataset)
    if not pathlib.Path(dataset).is_dir():
        raise UserError(f"tcm-eval: --dataset must be a folder of scans or a corpus written by tcm-prepare, "
                        f"got {dataset!r}")
    report = prepare_corpus(dataset, out / "corpus", label_dir=label_dir, label_names=label_names, progress=False)
    if report.failures:
        print(report.summary(), file=sys.stderr)
    return PreparedCorpus(out / "corpus")


def dataset_splits(corpus: PreparedCorpus, pretrained_on: Sequence[str], *, folds: int, seed: int
                   ) -> tuple[dict[str, int], list[tuple[list[str], list[str]]]]:
    """(scan key -> corpus index of the labelled scans, [(train keys, test keys)] per fold).

    Test scans are labelled scans whose content digest is not in ``pretrained_on`` (pretraining never
    read them), in ``folds`` folds; each fold trains on every other labelled scan.
    """
    labelled = {row["source"]: i for i, row in enumerate(corpus.rows) if row["labels"] is not None}
    unseen = [k for k, i in labelled.items() if corpus.rows[i]["digest"] not in set(pretrained_on)]
    if not unseen:
        raise UserError(f"tcm-eval: every labelled scan of the dataset ({len(labelled)}) was read by the "
                        f"checkpoint's pretraining; hold scans out of pretraining (config split / test_fraction)")
    if folds > len(unseen) or len(labelled) < 2:
        raise UserError(f"tcm-eval: --folds must be at most the number of scans pretraining never read "
                        f"({len(unseen)}), with another labelled scan to train on, got --folds {folds}")
    splits = []
    for test in split_folds(unseen, folds, seed):
        splits.append((sorted(k for k in labelled if k not in test), test))
    return labelled, splits


def evaluate_dataset(encoder, corpus: PreparedCorpus, pretrained_on: Sequence[str], *, task: str, folds: int,
                     fractions: Sequence[float], seeds: Sequence[int], split_seed: int, probe_steps: int,
                     finetune_steps: int, size: int, dim: int = 2) -> dict[str, list[dict[str, float]]]:
    """{"fold f": [per seed {"<mode>, labels <fraction> (<metric>)": score}]} on a user's labelled scans.

    2-D encoders: slices (:func:`scan_task`, ``size``-sided); 3-D encoders: volumes, ``size``-sided
    training patches (the pretraining crop) and sliding-window inference (Dice and HD95)."""
    labelled, splits = dataset_splits(corpus, pretrained_on, folds=folds, seed=split_seed)
    scans = {k: corpus.scan(i) for k, i in labelled.items()}
    if dim == 3:
        if task != "segmentation":
            raise UserError(f"tcm-eval: a 3-D encoder is evaluated on volume segmentation; --task must be "
                            f"segmentation, got {task}")
        return _evaluate_volumes(encoder, scans, splits, fractions=fractions, seeds=seeds, probe_steps=probe_steps,
                                 finetune_steps=finetune_steps, roi=size)
    metric = "Dice" if task == "segmentation" else "acc."
    results: dict[str, list[dict[str, float]]] = {}
    for f, (train, test) in enumerate(splits):
        for seed in seeds:
            scores = {}
            for fraction in fractions:
                t = scan_task(scans, label_subset(train, fraction, seed), test, task, size=size, seed=seed)
                for mode, steps in (("probe", probe_steps), ("finetune", finetune_steps)):
                    scores[f"{mode}, labels {fraction:g} ({metric})"] = evaluate_encoder(
                        encoder, t, mode=mode, steps=steps, seed=seed)
            results.setdefault(f"fold {f}", []).append(scores)
    return results


def _evaluate_volumes(encoder, scans, splits, *, fractions, seeds, probe_steps, finetune_steps, roi):
    ids = sorted({int(i) for s in scans.values() for i in np.unique(s.label_map) if i > 0})
    lut = np.zeros(max(ids) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    names = {i: n for s in scans.values() for i, n in s.label_names.items()}
    classes = ("background", *(names.get(i, f"label {i}") for i in ids))
    volumes = {}
    for k, s in scans.items():
        if s.image.ndim != 3:
            raise UserError(f"tcm-eval: a 3-D encoder needs volumes; scan {k!r} is a 2-D image")
        volumes[k] = (torch.from_numpy(normalize_intensity(s.image, s.modality)).float(),
                      torch.from_numpy(lut[s.label_map.astype(np.int64)]).long())
    results: dict[str, list[dict[str, float]]] = {}
    for f, (train, test) in enumerate(splits):
        for seed in seeds:
            scores = {}
            for fraction in fractions:
                task = VolumeTask("volumes (by scan)", classes, [volumes[k] for k in label_subset(train, fraction,
                                                                                                   seed)],
                                  [volumes[k] for k in test], tuple(scans[test[0]].spacing))
                for mode, steps in (("probe", probe_steps), ("finetune", finetune_steps)):
                    out = evaluate_volume_task(encoder, task, roi=roi, mode=mode, steps=steps, seed=seed)
                    scores[f"{mode}, labels {fraction:g} (Dice)"] = out.mean_dice
                    scores[f"{mode}, labels {fraction:g} (HD95)"] = float(np.nanmean(out.hd95))
            results.setdefault(f"fold {f}", []).append(scores)
    return results


def check_embedded_split(checkpoint_path: pathlib.Path, dataset: str) -> None:
    """Refuse to test a checkpoint pretrained on an embedded volume unless its ``split.json`` held out the
    very blocks the embedded tasks test on (a run from before the manifest read the test block)."""
    if dataset not in SCORED:
        return
    path = checkpoint_path.parent / SPLIT_FILE
    if not path.is_file():
        raise UserError(f"tcm-eval: {checkpoint_path} was pretrained on {dataset} without a split manifest ({path} "
                        f"is missing): its pretraining may have read the test block; pretrain it again")
    scan = load_embedded(dataset)[0]
    want = embedded_split(dataset, "_", scan.label_map, scan.label_names).blocks["_"]
    held = [b for blocks in SplitManifest.load(path).blocks.values() for b in blocks]
    if not all(b in held for b in want):
        raise UserError(f"tcm-eval: {path} held out blocks {held} of {dataset}, but the evaluation tests on {want}: "
                        f"pretraining read test slices")


def _pretrained_on(checkpoint_path: pathlib.Path) -> list[str]:
    path = checkpoint_path.parent / SPLIT_FILE
    if not path.is_file():
        raise UserError(f"tcm-eval: {path} is missing: the split manifest tcm-pretrain writes beside its "
                        f"checkpoint says which scans pretraining read; without it no test scan is known unseen")
    return SplitManifest.load(path).pretrained_on


def compare_runs(runs: Sequence[str], out: pathlib.Path, *, reference: str | None = None) -> pathlib.Path:
    """One report over several ``tcm-eval`` output folders (their ``results.json``): rows are
    ``<folder name>/<row>``; only metrics every row has are compared."""
    merged: dict[str, list[dict[str, float]]] = {}
    for run_dir in runs:
        path = pathlib.Path(run_dir) / "results.json"
        if not path.is_file():
            raise UserError(f"tcm-eval: --compare takes tcm-eval output folders; {path} is missing")
        for row, scores in json.loads(path.read_text()).items():
            merged[f"{pathlib.Path(run_dir).name}/{row}"] = scores
    shared = set.intersection(*(set(r[0]) for r in merged.values()))
    if not shared:
        raise UserError(f"tcm-eval: --compare: the runs {list(runs)} share no metric")
    merged = {row: [{k: v for k, v in r.items() if k in shared} for r in runs] for row, runs in merged.items()}
    if reference is not None and reference not in merged:
        raise UserError(f"tcm-eval: --reference must be one of the rows {sorted(merged)}, got {reference!r}")
    reference = reference or next(iter(merged))
    return write_report(merged, out, steps=None, seeds=range(len(merged[reference])),
                        title=f"Comparison of {len(runs)} evaluation runs", reference=reference)


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="tcm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint only")
    parser.add_argument("--methods", nargs="+", default=["random", "spark", "tcm", "anatomask", "amlp"],
                        metavar="METHOD",
                        help="pretraining methods to compare (random: the untrained encoder), or NAME=CONFIG.yaml "
                             "for a run of that config (e.g. spark_paper=configs/spark_paper.yaml); the budget "
                             "(--steps) and the key=value overrides apply to every run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per method (same budget)")
    # the step counts chosen from validation curves on the embedded chest task (docs/evaluation.md)
    parser.add_argument("--probe-steps", type=int, default=200, help="linear-probe steps (with --select-steps: "
                        "the budget the step count is chosen within)")
    parser.add_argument("--finetune-steps", type=int, default=400, help="fine-tuning steps (with --select-steps: "
                        "the budget the step count is chosen within)")
    parser.add_argument("--dataset", default=None,
                        help="with --checkpoint: a labelled folder (with --label-dir) or a prepared corpus")
    parser.add_argument("--label-dir", default=None, help="--dataset folder: label maps with the images' names")
    parser.add_argument("--label-names", default=None, help='--dataset folder: text file of "id name" lines')
    parser.add_argument("--task", default="segmentation", choices=("segmentation", "classification"))
    parser.add_argument("--folds", type=int, default=1, help="--dataset: cross-validation folds of the test scans")
    parser.add_argument("--label-fraction", type=float, nargs="+", default=[1.0],
                        help="fractions of the training scans (--dataset) or, in a comparison on the embedded "
                             "tasks, of the chest task's training slices whose labels are used")
    parser.add_argument("--split-seed", type=int, default=0, help="--dataset: seed of the folds")
    parser.add_argument("--size", type=int, default=128, help="--dataset: side slices are padded / cropped to")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                        help="tcm-eval output folders to compare in one report (paired by seed)")
    parser.add_argument("--reference", default=None,
                        help="--compare: the row differences are taken to (default: the first)")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="comparison of 2-D encoders: record the metric every N probe / fine-tune steps "
                             "(curves.png, curves.csv, curves.json); 3-D encoders: the validation Dice every N "
                             "steps (default: an eighth of the steps), the step count is chosen from it")
    parser.add_argument("--select-steps", action="store_true",
                        help="2-D comparison, with --curve-every: --probe-steps / --finetune-steps are budgets; one "
                             "step count per evaluation, for every method, is chosen from validation curves (carved "
                             "from the training side, never the test block) and the test metric is read there")
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="PretrainConfig key=value applied to every run")
    args = parser.parse_args(argv)
    if args.curve_every < 0:
        parser.error(f"--curve-every must be >= 0, got {args.curve_every}")
    for flag in ("steps", "probe_steps", "finetune_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.folds < 1:
        parser.error(f"--folds must be >= 1, got {args.folds}")
    bad = [f for f in args.label_fraction if not 0 < f <= 1]
    if bad:
        parser.error(f"--label-fraction must be in (0, 1], got {bad}")
    if args.dataset and not args.checkpoint:
        parser.error("--dataset evaluates one --checkpoint; give --checkpoint")
    out = pathlib.Path(args.out)
    if args.compare:
        print(compare_runs(args.compare, out, reference=args.reference).read_text())
        return 0
    if args.checkpoint and args.dataset:
        path = pathlib.Path(args.checkpoint)
        encoder, cfg = _encoder_from_checkpoint(path)
        pretrained_on = _pretrained_on(path)
        corpus = _dataset_corpus(args.dataset, args.label_dir, args.label_names, out)
        results = evaluate_dataset(encoder, corpus, pretrained_on, task=args.task, folds=args.folds,
                                   fractions=args.label_fraction, seeds=args.seeds, split_seed=args.split_seed,
                                   probe_steps=args.probe_steps, finetune_steps=args.finetune_steps,
                                   size=args.size if cfg.spatial_dims == 2 else cfg.image_size, dim=cfg.spatial_dims)
        path = write_report(results, out, steps=None, seeds=args.seeds,
                            title=f"{args.checkpoint} on {args.dataset} ({args.task}, split by scan, "
                                  f"seeds {list(args.seeds)})")
        print(path.read_text())
        return 0
    if args.checkpoint:
        encoder, cfg = _encoder_from_checkpoint(pathlib.Path(args.checkpoint))  # before the tasks: fail fast
        check_embedded_split(pathlib.Path(args.checkpoint), cfg.dataset)
        scores = evaluate(encoder, embedded_tasks(cfg.spatial_dims), probe_steps=args.probe_steps,
                          finetune_steps=args.finetune_steps, seed=0, dim=cfg.spatial_dims, roi=cfg.image_size)
        path = write_report({"checkpoint": [scores]}, out, steps=None, seeds=[0],
                            title=f"Evaluation of {args.checkpoint} (seed 0)")
        print(path.read_text())
        return 0
    for spec in args.methods:  # every run's config is checked before the first one trains
        run_config(spec, args.seeds[0], args.steps, out, args.overrides)
    run_comparison(args.methods, args.seeds, args.steps, out, args.overrides, args.probe_steps, args.finetune_steps,
                   progress=not args.no_progress, curve_every=args.curve_every, fractions=args.label_fraction,
                   select_steps=args.select_steps)
    print((out / "report.md").read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tcm-eval``: 0 on success, 2 on a user error (one line on stderr)."""
    return run("tcm-eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
