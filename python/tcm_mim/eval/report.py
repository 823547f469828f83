"""``tcm-eval``: pretrain every method at the same budget over several seeds, evaluate, report.

    tcm-eval --methods spark tcm anatomask amlp random --seeds 0 1 2 --steps 300 --out runs/eval
    tcm-eval --checkpoint runs/pretrain_tcm/checkpoint.pt     # evaluate one pretrained model

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

from ..cli.common import ArgumentParser, run
from ..errors import UserError
from ..models import SparKMIM, build_encoder
from ..train import PretrainConfig, Trainer, checkpoint, load_config
from ..train.config import METHODS, config_from_dict
from .probe import evaluate_encoder
from .tasks import brain_lobe_task, chest_organ_task

EVALS = (("chest organs, probe (Dice)", "chest", "probe"), ("chest organs, fine-tune (Dice)", "chest", "finetune"),
         ("brain lobes, probe (acc.)", "brain", "probe"))


def evaluate(encoder, tasks, *, probe_steps: int, finetune_steps: int, seed: int) -> dict[str, float]:
    out = {}
    for label, task_key, mode in EVALS:
        steps = probe_steps if mode == "probe" else finetune_steps
        out[label] = evaluate_encoder(encoder, tasks[task_key], mode=mode, steps=steps, seed=seed)
    return out


def _encoder_from_checkpoint(path: pathlib.Path):
    """The pretrained sparse encoder of a tcm-pretrain checkpoint (verified, loaded with weights_only=True)."""
    state = checkpoint.load(path, required=("model", "config"))
    cfg = config_from_dict(state["config"], source=str(path))
    if cfg.spatial_dims != 2:
        raise UserError(f"tcm-eval: {path} holds a {cfg.spatial_dims}-D encoder ({cfg.encoder}); the evaluation "
                        f"tasks are 2-D")
    model = SparKMIM(build_encoder(cfg.encoder, dim=2, in_channels=1), decoder_width=cfg.decoder_width)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # missing / unexpected keys or shapes: the file does not match its config
        raise checkpoint.CheckpointError(f"checkpoint {path}: its weights do not fit the model its config "
                                         f"describes: {str(err).splitlines()[0]}") from None
    return model.encoder


def run_comparison(methods, seeds, steps, out: pathlib.Path, overrides, probe_steps, finetune_steps, progress=True):
    """Pretrain and evaluate every (method, seed); a run whose ``eval.json`` records the same
    configuration and evaluation budget is reused, so an interrupted comparison continues."""
    tasks = {"chest": chest_organ_task(), "brain": brain_lobe_task()}
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}_seed{seed}"
            base = ["method=spark" if method == "random" else f"method={method}", f"seed={seed}", f"steps={steps}",
                    f"out_dir={run_dir}", "image_every=0", *overrides]
            cfg = load_config(None, base)
            key = {"config": dataclasses.asdict(cfg), "trained": method != "random", "probe_steps": probe_steps,
                   "finetune_steps": finetune_steps}
            done = run_dir / "eval.json"
            if done.exists() and _with_defaults(json.loads(done.read_text())["key"]) == key:
                results[method].append(json.loads(done.read_text())["scores"])
                print(f"{method} seed {seed}: reused {done}", flush=True)
                continue
            trainer = Trainer(cfg)
            if method != "random":  # random: the same architecture, initialised with the same seed, not trained
                trainer.train(progress=progress)
            results[method].append(evaluate(trainer.model.encoder, tasks, probe_steps=probe_steps,
                                            finetune_steps=finetune_steps, seed=seed))
            run_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"key": key, "scores": results[method][-1]}, indent=1))
            print(f"{method} seed {seed}: {results[method][-1]}", flush=True)
    write_report(results, out, steps=steps, seeds=seeds)
    return results


def _with_defaults(key: dict) -> dict:
    """A recorded run key with config fields added since it was written set to their defaults (a
    run recorded before a field existed ran with the behaviour its default keeps)."""
    defaults = dataclasses.asdict(PretrainConfig())
    return {**key, "config": {**{k: v for k, v in defaults.items() if k not in key["config"]}, **key["config"]}}


def write_report(results, out: pathlib.Path, *, steps: int | None, seeds, title: str | None = None) -> pathlib.Path:
    labels = [e[0] for e in EVALS]
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

    fig, axes = plt.subplots(1, len(summary), figsize=(4 * len(summary), 3))
    for ax, (label, by_method) in zip(axes, summary.items()):
        names = list(by_method)
        ax.bar(names, [by_method[m][0] for m in names], yerr=[by_method[m][1] for m in names], capsize=3)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="tcm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint only")
    parser.add_argument("--methods", nargs="+", default=["random", "spark", "tcm", "anatomask", "amlp"],
                        choices=("random", *METHODS), metavar="METHOD",
                        help="pretraining methods to compare (random: the untrained encoder)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per method (same budget)")
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="PretrainConfig key=value applied to every run")
    args = parser.parse_args(argv)
    for flag in ("steps", "probe_steps", "finetune_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    out = pathlib.Path(args.out)
    if args.checkpoint:
        encoder = _encoder_from_checkpoint(pathlib.Path(args.checkpoint))  # before the tasks: fail fast
        tasks = {"chest": chest_organ_task(), "brain": brain_lobe_task()}
        scores = evaluate(encoder, tasks, probe_steps=args.probe_steps, finetune_steps=args.finetune_steps, seed=0)
        path = write_report({"checkpoint": [scores]}, out, steps=None, seeds=[0],
                            title=f"Evaluation of {args.checkpoint} (seed 0)")
        print(path.read_text())
        return 0
    for method in args.methods:  # every run's config is checked before the first one trains
        load_config(None, ["method=spark" if method == "random" else f"method={method}", f"steps={args.steps}",
                           *args.overrides])
    run_comparison(args.methods, args.seeds, args.steps, out, args.overrides, args.probe_steps, args.finetune_steps,
                   progress=not args.no_progress)
    print((out / "report.md").read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tcm-eval``: 0 on success, 2 on a user error (one line on stderr)."""
    return run("tcm-eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
