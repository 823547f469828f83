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

import torch

from ..models import SparKMIM, build_encoder
from ..train import PretrainConfig, Trainer, load_config
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
    state = torch.load(path, weights_only=False)
    cfg = PretrainConfig(**state["config"])
    model = SparKMIM(build_encoder(cfg.encoder, dim=2, in_channels=1), decoder_width=cfg.decoder_width)
    model.load_state_dict(state["model"])
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
            if done.exists() and json.loads(done.read_text())["key"] == key:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcm-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint only")
    parser.add_argument("--methods", nargs="+", default=["random", "spark", "tcm", "anatomask", "amlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per method (same budget)")
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--out", default="runs/eval")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="PretrainConfig key=value applied to every run")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.checkpoint:
        tasks = {"chest": chest_organ_task(), "brain": brain_lobe_task()}
        encoder = _encoder_from_checkpoint(pathlib.Path(args.checkpoint))
        scores = evaluate(encoder, tasks, probe_steps=args.probe_steps, finetune_steps=args.finetune_steps, seed=0)
        path = write_report({"checkpoint": [scores]}, out, steps=None, seeds=[0],
                            title=f"Evaluation of {args.checkpoint} (seed 0)")
        print(path.read_text())
        return 0
    run_comparison(args.methods, args.seeds, args.steps, out, args.overrides, args.probe_steps, args.finetune_steps,
                   progress=not args.no_progress)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
