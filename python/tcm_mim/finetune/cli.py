"""``tcm-finetune``: segmentation fine-tuning with few labels (supervised, mean teacher, CORN).

Examples::

    tcm-finetune --semi corn --label-fraction 0.1 --steps 200 --out-dir runs/corn
    tcm-finetune --semi corn --checkpoint runs/pretrain_tcm/checkpoint.pt --label-fraction 0.25
    tcm-finetune --task /data/ct --label-dir /data/ct_labels --semi mean_teacher
    tcm-finetune --dim 3 --encoder resnet3d_tiny --depth 16 --image-size 96 --semi corn

Every FinetuneConfig field is a flag (underscores become dashes). Writes <out-dir>/log.csv,
checkpoint.pt and result.json (mean test Dice over the foreground classes, per class, for
the student and the teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence

from ..cli.common import ArgumentParser, run
from .config import SEMI_MODES, FinetuneConfig
from .trainer import finetune

_HELP = {"semi": f"one of {', '.join(SEMI_MODES)}"}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="tcm-finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        hint = hints[f.name]
        kind = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                            choices=SEMI_MODES if f.name == "semi" else None,
                            help=f"{_HELP.get(f.name, '')} (default: {f.default})".strip())
    parser.add_argument("--progress", action="store_true", help="print the losses every log_every steps")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = vars(_parser().parse_args(argv))
    progress = args.pop("progress")
    cfg = FinetuneConfig(**args)  # a wrong value is a UserError: one line, exit 2
    result = finetune(cfg, progress=progress)
    print(json.dumps({"dice": result["dice"], "per_class": result["scores"]["student"]["per_class"],
                      "sizes": result["sizes"], "out_dir": cfg.out_dir}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tcm-finetune``: errors in arguments, config values or data are one stderr line and exit status 2."""
    return run("tcm-finetune", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
