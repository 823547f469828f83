"""Pretraining steps per second: our kernels vs the same model on ``backend="reference"``.

One step is what ``tcm-pretrain`` does per iteration: the method's batch, patch scores
and masks, the SparK model's forward (both masked views for ``tcm``, plus InfoNCE of
the pooled embeddings), backward and the AdamW update. The baseline is the identical
Trainer (same config, seed, weights, data and masks) with every tcm_kernels op on its
plain-PyTorch reference path, which for the sparse convolution is SparK's dense
emulation (dense conv of the masked input, mask re-applied) — what a user runs without
this library (``tcm-pretrain backend=reference``).

Shapes (issue #8): 2-D 224^2 crops of the embedded chest CT, batch 8, the reference
config's encoder (``resnet_tiny``) and ResNet-18. Steps/s is ``1 / median`` of the
table; ``images_per_s`` in extra_info. ``--benchmark-disable`` (CI) shrinks to 64^2,
batch 2.
"""

from __future__ import annotations

import itertools
import pathlib

import pytest

from benchmarks.common import run
from tcm_mim.train import Trainer, load_config

ENCODERS = ["resnet_tiny", "resnet18"]
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain_tcm.yaml"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("method", ["spark", "tcm"])
@pytest.mark.parametrize("provider", ["reference", "tcm_cpu"])
def test_pretrain_step(benchmark, tmp_path_factory, provider, method, encoder):
    size, batch = (64, 2) if benchmark.disabled else (224, 8)
    overrides = [f"method={method}", f"encoder={encoder}", f"image_size={size}", f"batch_size={batch}",
                 "steps=1000", "warmup_steps=10", "seed=0", "image_every=0",
                 f"out_dir={tmp_path_factory.mktemp('bench_pretrain')}"]
    if provider == "reference":
        overrides.append("backend=reference")
    trainer = Trainer(load_config(CONFIG, overrides))
    trainer.model.train()
    steps = itertools.count()

    def step():  # the body of Trainer.train's loop, without logging
        losses = trainer.compute_loss(next(steps))
        trainer.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        trainer.optimizer.step()
        trainer.scheduler.step()

    run(benchmark, step, group=f"pretrain-step-{method}-{encoder}-{size}px-b{batch}", provider=provider,
        baseline=provider == "reference", method=method, encoder=encoder, image_size=size, batch=batch)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
