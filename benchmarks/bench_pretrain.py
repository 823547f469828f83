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

3-D (issue 15), group ``pretrain-step-3d-*``: one step of ``configs/pretrain_tcm3d.yaml`` as shipped
(``tcm``, ``resenc3d``, 64^3 crops, batch 2: 4 encoder passes of the 2 masked views) against the same config
with ``backend=reference``; ~1 min per step with one thread on this project's 2-core CPU for ours, so the
group takes ~15-25 min (7 steps per provider). ``--benchmark-disable``: ``resenc3d_tiny``.

Precision and compile (issue #18), ``resnet_tiny`` only, groups ``pretrain-modes-*``:
``fp32`` (eager, the baseline), ``bf16`` (``precision=bf16``, autocast) and ``compiled``
(``compile=true``, inductor, fp32; compiled during two warm-up steps outside the timing).
They run on the GPU when one is present (``device=auto``; the group names the device); on a
CPU, bf16 may well be slower than fp32 (no bf16 matrix units on most CPUs). Under
``--benchmark-disable`` the compiled row uses dynamo's ``eager`` backend: a smoke run must
not spend minutes in inductor's C++ build.
"""

from __future__ import annotations

import pathlib

import pytest

from benchmarks.common import run
from tcm_mim.train import Trainer, load_config
from tcm_mim.train.device import resolve_device

ENCODERS = ["resnet_tiny", "resnet18"]
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain_tcm.yaml"
CONFIG_3D = CONFIG.with_name("pretrain_tcm3d.yaml")


def _overrides(method: str, encoder: str, size: int, batch: int, out_dir) -> list[str]:
    return [f"method={method}", f"encoder={encoder}", f"image_size={size}", f"batch_size={batch}",
            "steps=1000", "warmup_steps=10", "seed=0", "image_every=0", f"out_dir={out_dir}"]


def _bench_steps(benchmark, trainer: Trainer, *, group: str, provider: str, baseline: bool, **info) -> None:
    trainer.model.train()

    def step():  # Trainer.train's loop body without logging: micro-batches, backward, guard, update
        trainer.train_step()
        trainer.step += 1

    device = trainer.device.type
    run(benchmark, step, group=group, provider=provider, baseline=baseline, device=device, **info)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = info["batch"] / benchmark.stats.stats.median


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("method", ["spark", "tcm"])
@pytest.mark.parametrize("provider", ["reference", "tcm_cpu"])
def test_pretrain_step(benchmark, tmp_path_factory, provider, method, encoder):
    size, batch = (64, 2) if benchmark.disabled else (224, 8)
    overrides = _overrides(method, encoder, size, batch, tmp_path_factory.mktemp("bench_pretrain")) + \
        ["device=cpu", "precision=fp32"]
    if provider == "reference":
        overrides.append("backend=reference")
    trainer = Trainer(load_config(CONFIG, overrides))
    _bench_steps(benchmark, trainer, group=f"pretrain-step-{method}-{encoder}-{size}px-b{batch}", provider=provider,
                 baseline=provider == "reference", method=method, encoder=encoder, image_size=size, batch=batch)


@pytest.mark.parametrize("provider", ["reference", "tcm_cpu"])
def test_pretrain_step_3d(benchmark, tmp_path_factory, provider):
    overrides = ["steps=1000", "warmup_steps=10", "seed=0", "image_every=0", "checkpoint_every=1000",
                 f"out_dir={tmp_path_factory.mktemp('bench_pretrain3d')}", "device=cpu", "precision=fp32"]
    if benchmark.disabled:
        overrides.append("encoder=resenc3d_tiny")
    if provider == "reference":
        overrides.append("backend=reference")
    cfg = load_config(CONFIG_3D, overrides)
    trainer = Trainer(cfg)
    _bench_steps(benchmark, trainer, group=f"pretrain-step-3d-{cfg.method}-{cfg.encoder}-{cfg.image_size}px-"
                 f"b{cfg.batch_size}", provider=provider, baseline=provider == "reference", method=cfg.method,
                 encoder=cfg.encoder, image_size=cfg.image_size, batch=cfg.batch_size)


@pytest.mark.parametrize("method", ["spark", "tcm"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "compiled"])
def test_pretrain_step_precision_compile(benchmark, tmp_path_factory, mode, method):
    encoder = "resnet_tiny"
    size, batch = (64, 2) if benchmark.disabled else (224, 8)
    device = resolve_device("auto")
    overrides = _overrides(method, encoder, size, batch, tmp_path_factory.mktemp("bench_pretrain")) + \
        [f"device={device}", f"precision={'bf16' if mode == 'bf16' else 'fp32'}", f"compile={mode == 'compiled'}"]
    trainer = Trainer(load_config(CONFIG, overrides), compile_backend="eager" if benchmark.disabled else "inductor")
    if mode == "compiled" and not benchmark.disabled:
        for _ in range(2):  # compile, then the one recompile that makes the step-dependent ints dynamic
            trainer.train_step()
            trainer.step += 1
    _bench_steps(benchmark, trainer, group=f"pretrain-modes-{method}-{encoder}-{size}px-b{batch}-{device.type}",
                 provider=mode, baseline=mode == "fp32", method=method, encoder=encoder, image_size=size,
                 batch=batch)
