"""Paired comparison of the fine-tuning modes: label fractions x inits x seeds x ``--semi``.

    python -m tcm_mim.finetune.report --fractions 0.1 0.25 --seeds 0 1 2 --steps 300 \
        --checkpoint runs/pretrain_tcm/checkpoint.pt --out runs/finetune_compare

Every run of one (fraction, init, seed) shares the labelled/unlabelled split, the initial
weights and the labelled batches' seed, so the modes are compared in pairs: the report gives
mean ± std of the test Dice per mode and, per pair of modes, the per-seed differences, their
mean and a bootstrap 95 % interval of that mean (10 000 resamples of the seeds; with 3 seeds
it can only say whether every seed agrees). A run whose ``result.json`` has the same config
is reused, so an interrupted comparison continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

import numpy as np

from .config import FinetuneConfig
from .trainer import finetune

MODES = ("none", "mean_teacher", "corn")
PAIRS = (("mean_teacher", "none"), ("corn", "none"), ("corn", "mean_teacher"))


def parse_arm(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, FinetuneConfig overrides), e.g. ``corn_tau0.3:semi=corn,tau=0.3``."""
    name, sep, body = text.partition(":")
    types = {f.name: type(f.default) for f in dataclasses.fields(FinetuneConfig) if f.default is not None}
    items = [item.partition("=") for item in body.split(",") if item] if sep else []
    if not name or name in MODES or not items or any(not eq or key not in types for key, eq, _ in items):
        raise ValueError(f"an extra arm is NAME:key=value[,key=value] with a new NAME and keys in {sorted(types)}, "
                         f"got {text!r}")
    values = {key: types[key](value) for key, _, value in items}
    if "semi" not in values:
        raise ValueError(f"an extra arm must set semi (one of {MODES}), got {text!r}")
    return name, values


def bootstrap_interval(diffs: list[float], *, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``diffs`` (resampling with replacement)."""
    rng = np.random.default_rng(seed)
    values = np.asarray(diffs, dtype=np.float64)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def run_grid(fractions, seeds, inits: dict[str, str | None], steps: int, out: pathlib.Path, overrides: dict,
             arms: dict[str, dict] | None = None):
    """Run (or reuse) every (fraction, init, seed, arm); returns {(fraction, init): {arm: [dice per seed]}}.
    The arms are the three modes and ``arms`` ({name: config overrides}, e.g. an ablation)."""
    arms = {**{m: {"semi": m} for m in MODES}, **(arms or {})}
    scores: dict = {}
    for fraction in fractions:
        for init, checkpoint in inits.items():
            for seed in seeds:
                for mode, arm in arms.items():
                    run_dir = out / f"f{fraction}_{init}_seed{seed}_{mode}"
                    cfg = FinetuneConfig(label_fraction=fraction, checkpoint=checkpoint, seed=seed,
                                         steps=steps, out_dir=str(run_dir), **{**overrides, **arm})
                    done = run_dir / "result.json"
                    if done.exists() and json.loads(done.read_text())["config"] == dataclasses.asdict(cfg):
                        result = json.loads(done.read_text())
                    else:
                        result = finetune(cfg)
                    scores.setdefault((fraction, init), {}).setdefault(mode, []).append(result["dice"])
                    print(f"fraction {fraction} {init} seed {seed} {mode}: Dice {result['dice']:.3f} "
                          f"({result['train_seconds']} s)", flush=True)
    return scores


def write_report(scores, out: pathlib.Path, *, title: str) -> str:
    arms = list(next(iter(scores.values())))
    pairs = [*PAIRS, *((a, b) for a in arms if a not in MODES for b in ("none", "mean_teacher"))]
    lines = [f"# {title}", "", "Test Dice (mean over foreground classes), mean ± std over seeds:", "",
             "| label fraction | init | " + " | ".join(arms) + " |", "|---|---|" + "---:|" * len(arms)]
    for (fraction, init), by_mode in scores.items():
        cells = [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"
                 for v in (by_mode[m] for m in arms)]
        lines.append(f"| {fraction:g} | {init} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same split, init and seed), per seed; mean [bootstrap 95 % interval]:", "",
              "| label fraction | init | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
              "|---|---|" + "---:|" * len(pairs)]
    for (fraction, init), by_mode in scores.items():
        cells = []
        for a, b in pairs:
            diffs = [x - y for x, y in zip(by_mode[a], by_mode[b])]
            lo, hi = bootstrap_interval(diffs)
            cells.append(" ".join(f"{d:+.3f}" for d in diffs) + f"; {statistics.fmean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {fraction:g} | {init} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({f"{f}|{i}": v for (f, i), v in scores.items()}, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcm_mim.finetune.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint", default=None, help="tcm-pretrain checkpoint: adds the 'pretrained' init")
    parser.add_argument("--out", default="runs/finetune_compare")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME:key=value,...",
                        help="more arms, e.g. corn_tau0.3:semi=corn,tau=0.3 (compared with none and mean_teacher)")
    parser.add_argument("overrides", nargs="*", help="FinetuneConfig key=value (ints/floats/strings) for every run")
    args = parser.parse_args(argv)
    types = {f.name: type(f.default) for f in dataclasses.fields(FinetuneConfig) if f.default is not None}
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            parser.error(f"overrides are key=value with key in {sorted(types)}, got {item!r}")
        overrides[key] = types[key](value)
    try:
        arms = dict(parse_arm(a) for a in args.extra)
    except ValueError as err:
        parser.error(str(err))
    inits = {"random": None, **({"pretrained": args.checkpoint} if args.checkpoint else {})}
    scores = run_grid(args.fractions, args.seeds, inits, args.steps, pathlib.Path(args.out), overrides, arms)
    print(write_report(scores, pathlib.Path(args.out),
                       title=f"Fine-tuning modes compared ({args.steps} steps each, seeds {args.seeds})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
