"""``tcm-pretrain``: reference pretraining from a YAML config plus ``key=value`` overrides.

Examples::

    tcm-pretrain method=spark steps=100
    tcm-pretrain --config configs/tcm_chest_ct.yaml lr=1e-3 --resume
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config
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
    trainer = Trainer(cfg)
    ckpt = trainer.train(resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {ckpt}\nlog: {trainer.out / 'log.csv'}\nimages: {trainer.out}/step*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
