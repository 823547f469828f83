"""``tcm-pretrain``: reference pretraining from a YAML config plus ``key=value`` overrides.

Examples::

    tcm-pretrain method=spark steps=100
    tcm-pretrain device=cuda precision=bf16 compile=true grad_accum_steps=4 max_grad_norm=1.0
    tcm-pretrain --config configs/pretrain_tcm.yaml steps=500 --resume
    tcm-pretrain --config configs/pretrain_tcm.yaml lr=1e-3 --resume --apply-config-changes
    tcm-pretrain --config configs/pretrain_tcm3d.yaml method=amlp   # 3-D: dim follows the encoder
    torchrun --nproc_per_node=2 -m tcm_mim.train.cli --config configs/pretrain_tcm.yaml

Under torchrun every rank trains on its own items of the stream, gradients are averaged
(DDP), the sparse batch norms synchronise their statistics and the InfoNCE negatives
are gathered from all ranks; rank 0 writes logs and checkpoints.

--resume continues from <out_dir>/checkpoint.pt (a fresh run, with a warning, if there is
none). A key that changes the run and differs from the checkpoint's config is refused with
the list of changes (old -> new) unless --apply-config-changes applies them (the
optimiser's lr included); the keys that may change freely and those that never can are
listed after the config keys. One run at a time per out_dir (<out_dir>/run.lock). A user
error prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..cli.common import ArgumentParser, run
from .config import FIXED, FREE, GROW, describe_keys, keys_with_resume_rule, load_config
from .device import process_group_backend, resolve_device
from .trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``tcm-pretrain``; its help lists every config key from the config's declarations."""
    epilog = "\n".join([
        "config keys (key  type = default  meaning [allowed values]):", describe_keys(), "",
        f"--resume: may change freely: {', '.join(keys_with_resume_rule(FREE))}; may grow: "
        f"{', '.join(keys_with_resume_rule(GROW))}; never change: {', '.join(keys_with_resume_rule(FIXED))}"])
    parser = ArgumentParser(prog="tcm-pretrain", description=__doc__, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of config keys (listed below)")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    parser.add_argument("--apply-config-changes", action="store_true",
                        help="with --resume: continue with the keys that differ from the checkpoint's config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. method=spark steps=50 lr=1e-3")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.apply_config_changes and not args.resume:
        parser.error("--apply-config-changes applies only with --resume")
    cfg = load_config(args.config, args.overrides)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device = resolve_device(cfg.device)  # cuda:$LOCAL_RANK under torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(process_group_backend(device))
    try:
        trainer = Trainer(cfg)
        ckpt = trainer.train(resume=args.resume, apply_changes=args.apply_config_changes,
                             progress=not args.no_progress)
    finally:
        if distributed:
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"checkpoint: {ckpt}\nlog: {trainer.out / 'log.csv'}\nimages: {trainer.out}/step*.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tcm-pretrain``: 0 on success, 2 on a user error (one line on stderr)."""
    return run("tcm-pretrain", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
