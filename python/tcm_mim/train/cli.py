"""``tcm-pretrain``: reference pretraining from a YAML config plus ``key=value`` overrides.

Examples::

    tcm-pretrain method=spark steps=100
    tcm-pretrain device=cuda precision=bf16 compile=true grad_accum_steps=4 max_grad_norm=1.0
    tcm-pretrain --config configs/pretrain_tcm.yaml lr=1e-3 --resume
    tcm-pretrain --config configs/pretrain_tcm3d.yaml method=amlp   # 3-D: dim follows the encoder
    torchrun --nproc_per_node=2 -m tcm_mim.train.cli --config configs/pretrain_tcm.yaml

Under torchrun every rank trains on its own items of the stream, gradients are averaged
(DDP), the sparse batch norms synchronise their statistics and the InfoNCE negatives
are gathered from all ranks; rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .config import load_config
from .device import process_group_backend, resolve_device
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcm-pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with PretrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. method=spark steps=50")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device = resolve_device(cfg.device)  # cuda:$LOCAL_RANK under torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(process_group_backend(device))
    try:
        trainer = Trainer(cfg)
        ckpt = trainer.train(resume=args.resume, progress=not args.no_progress)
    finally:
        if distributed:
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"checkpoint: {ckpt}\nlog: {trainer.out / 'log.csv'}\nimages: {trainer.out}/step*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
