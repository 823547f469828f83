"""Corpora larger than memory: tcm-prepare throughput, loader throughput, model consumption, peak memory.

Synthetic CT-like volumes with label maps (:func:`write_synthetic_ct`: air, a body ellipse of soft
tissue, two lungs, heart, liver, spine, noise; int16 HU NIfTI + uint8 labels) are the corpus.

pytest (``python -m benchmarks benchmarks/bench_data.py``; ``--benchmark-disable`` in CI runs
every function once on 24 x 32 x 32 volumes):

* ``prepare``: tcm-prepare volumes/s with 1 and 2 worker processes;
* ``loader``: crops/s of the DataLoader with 0 and 2 workers (2-D 128^2 batch 8, 3-D 96^3 batch 2);
* ``model``: crops/s the model consumes (one training step of resnet_tiny 2-D 128^2 batch 8,
  the 3-D config's resnet3d_tiny at 96^3 batch 2), the rate the loader must keep up with.

The full measurement of the README (peak memory of a 20-step tcm-pretrain, worker processes
included, on 8 versus 64 volumes of 256 x 256 x 160; the share of each step spent waiting for
data): ``python -m benchmarks.bench_data --root /tmp/bench_data`` (writes ~2.6 GB of NIfTI and
~1 GB of corpus; prints a Markdown table with the CPU, ISA flags and thread counts).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from tcm_mim.data import PreparedCorpus, prepare_corpus
from tcm_mim.train import PretrainConfig, Trainer
from tcm_mim.train.loader import build_loader
from tcm_mim.train.stream import SliceStream, VolumeStream

LABELS = {1: "lung_left", 2: "lung_right", 3: "heart", 4: "liver", 5: "spine"}
FULL_SHAPE = (256, 256, 160)  # NIfTI [x, y, z]: 160 axial slices of 256^2
SMOKE_SHAPE = (32, 32, 24)


def write_synthetic_ct(folder: pathlib.Path, count: int, shape: tuple[int, int, int] = FULL_SHAPE,
                       seed: int = 0) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Write ``count`` CT-like volumes and label maps; returns (images dir, labels dir, names file).

    Each volume: int16 HU [x, y, z] at 1 x 1 x 2 mm (uncompressed NIfTI, as scanners export),
    anatomy shifted and scaled at random per volume; labels uint8 with the ids of ``LABELS``.
    Existing files are kept (a second call only adds what is missing).
    """
    import nibabel as nib

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    names = folder / "names.txt"
    names.write_text("".join(f"{k} {v}\n" for k, v in LABELS.items()))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(count):
        if (labels / f"ct{i:03d}.nii").exists():
            continue
        rng = np.random.default_rng(seed + i)
        x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
        x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
        sx, sy = rng.uniform(0.8, 0.95, 2)
        dx, dy = rng.uniform(-0.05, 0.05, 2)

        def blob(cx, cy, cz, rx, ry, rz):
            return ((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1

        body = ((x - dx) / sx) ** 2 + ((y - dy) / (0.7 * sy)) ** 2 <= 1
        seg = np.zeros(shape, np.uint8)
        for label, region in ((4, blob(-0.3, 0.1, -0.6, 0.35, 0.3, 0.35)), (1, blob(0.35, 0.0, 0.3, 0.25, 0.35, 0.6)),
                              (2, blob(-0.35, 0.0, 0.3, 0.28, 0.35, 0.6)), (3, blob(0.1, -0.15, 0.0, 0.2, 0.18, 0.2)),
                              (5, blob(0.0, 0.45, 0.0, 0.08, 0.08, 1.2))):
            seg[region & body] = label
        hu = np.array([40, -820, -820, 45, 60, 500], np.float32)[seg]
        hu = np.where(body | (seg > 0), hu, -1000.0)
        hu += rng.normal(0, 12, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(images / f"ct{i:03d}.nii"))
        nib.save(nib.Nifti1Image(seg, affine), str(labels / f"ct{i:03d}.nii"))
    return images, labels, names


def _subset(images: pathlib.Path, count: int, folder: pathlib.Path) -> pathlib.Path:
    """A folder of symbolic links to the first ``count`` volumes of ``images``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir())[:count]:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    return folder


# ---------------------------------------------------------------------------------------------- pytest

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, request):
    disabled = request.config.getoption("benchmark_disable", False)
    root = tmp_path_factory.mktemp("bench_data")
    count, shape = (2, SMOKE_SHAPE) if disabled else (4, FULL_SHAPE)
    images, labels, names = write_synthetic_ct(root / "raw", count, shape)
    prepare_corpus(images, root / "corpus", label_dir=labels, label_names=names, progress=False)
    return root, images, labels, names, disabled


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare(benchmark, synthetic, workers):
    root, images, labels, names, _ = synthetic
    out = root / f"prepare_w{workers}"
    benchmark.group = "data-prepare"
    benchmark.extra_info.update(provider=f"{workers} workers", baseline=workers == 1, machine=_machine())

    def fresh():
        shutil.rmtree(out, ignore_errors=True)

    benchmark.pedantic(lambda: prepare_corpus(images, out, label_dir=labels, label_names=names, workers=workers,
                                              progress=False), setup=fresh, rounds=1 if benchmark.disabled else 3)
    count = len(list(images.iterdir()))
    assert len(PreparedCorpus(out)) == count
    if not benchmark.disabled:
        benchmark.extra_info["volumes_per_s"] = count / benchmark.stats.stats.median


def _stream(corpus: PreparedCorpus, dim: int, size: int):
    return (VolumeStream if dim == 3 else SliceStream)(corpus, size, seed=0)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader(benchmark, synthetic, workers, dim):
    root, *_, disabled = synthetic
    size, batch, steps = (16, 2, 2) if disabled else ((128, 8, 20) if dim == 2 else (96, 2, 10))
    stream = _stream(PreparedCorpus(root / "corpus"), dim, size)
    benchmark.group = f"data-loader-{dim}d-{size}px-b{batch}"
    benchmark.extra_info.update(provider=f"{workers} workers", baseline=workers == 0, machine=_machine())
    start = iter(range(0, 10**9, steps))

    def load():
        first = next(start)
        for images, _ in build_loader(stream, batch, first, first + steps, num_workers=workers):
            assert images.shape == (batch, 1, *(size,) * dim)

    benchmark.pedantic(load, rounds=1 if disabled else 3)
    if not disabled:
        benchmark.extra_info["crops_per_s"] = steps * batch / benchmark.stats.stats.median


@pytest.mark.parametrize("dim", [2, 3])
def test_model(benchmark, synthetic, tmp_path, dim):
    """The crops/s one training step consumes: the rate the loader has to sustain."""
    root, *_, disabled = synthetic
    size, batch = ((64 if dim == 2 else 32), 2) if disabled else ((128, 8) if dim == 2 else (96, 2))
    cfg = PretrainConfig(method="spark", dataset=str(root / "corpus"), encoder="resnet3d_tiny" if dim == 3 else
                         "resnet_tiny", decoder_width=16 if dim == 3 else 64, image_size=size, batch_size=batch,
                         steps=1000, image_every=0, out_dir=str(tmp_path))
    trainer = Trainer(cfg)
    batches = [trainer.stream.batch(i, batch) for i in range(2)]
    step = iter(range(10**9))

    def train_step():
        i = next(step)
        losses = trainer.compute_loss(i, batches=iter([batches[i % 2]]))  # batches built once
        trainer.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        trainer.optimizer.step()

    benchmark.group = f"data-model-{dim}d-{size}px-b{batch}"
    benchmark.extra_info.update(provider=cfg.encoder, baseline=True, machine=_machine())
    benchmark.pedantic(train_step, rounds=1 if disabled else 5, warmup_rounds=0 if disabled else 1)
    if not disabled:
        benchmark.extra_info["crops_per_s"] = batch / benchmark.stats.stats.median


# ---------------------------------------------------------------------------------------------- memory

def _children(pid: int) -> list[int]:
    out = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``pid`` and its descendants (PSS splits shared pages)."""
    rss = pss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in pathlib.Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
        stack += _children(p)
    return rss, pss


def peak_tree_memory(cmd: list[str], interval: float = 0.05) -> dict:
    """Run ``cmd``; the peak over time of the process tree's summed RSS and PSS, and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(interval)

    thread = threading.Thread(target=poll)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"peak_rss": peak[0], "peak_pss": peak[1], "wall_s": time.perf_counter() - t0}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        isa = "+".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except (OSError, StopIteration):
        isa = "?"
    return f"{cpu} ({isa}), {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=pathlib.Path, required=True, help="scratch folder (several GB)")
    parser.add_argument("--counts", type=int, nargs=2, default=(8, 64), help="small and large corpus (default 8 64)")
    parser.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=FULL_SHAPE)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    small, large = args.counts
    lines = [f"Machine: {_machine()}; volumes {args.shape} (NIfTI x, y, z), int16 HU + uint8 labels.", ""]
    print(lines[0], flush=True)
    t0 = time.perf_counter()
    images, labels, names = write_synthetic_ct(args.root / "raw", large, args.shape)
    print(f"wrote {large} volumes in {time.perf_counter() - t0:.0f} s", flush=True)
    subset = _subset(images, small, args.root / f"raw_{small}")
    rows = ["| measurement | value | load |", "|---|---:|---|"]
    for workers in (1, 2):  # tcm-prepare throughput on the small corpus
        out = args.root / f"corpus_{small}_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        prepare_corpus(subset, out, label_dir=labels, label_names=names, workers=workers, progress=False)
        rate = small / (time.perf_counter() - t)
        rows.append(f"| tcm-prepare, {workers} worker(s), {small} volumes | {rate:.2f} volumes/s | {_load()} |")
        print(rows[-1], flush=True)
    corpora = {small: args.root / f"corpus_{small}_w2", large: args.root / f"corpus_{large}"}
    t = time.perf_counter()
    report = prepare_corpus(images, corpora[large], label_dir=labels, label_names=names, workers=args.workers,
                            progress=False)
    rows.append(f"| tcm-prepare, {args.workers} workers, {large} volumes ({report.prepared} new) | "
                f"{report.prepared / (time.perf_counter() - t):.2f} volumes/s | {_load()} |")
    print(rows[-1], flush=True)
    peaks = {}
    for count, corpus in corpora.items():  # peak memory of tcm-pretrain, workers included
        cmd = [sys.executable, "-m", "tcm_mim.train.cli", "--no-progress", "method=spark", f"dataset={corpus}",
               f"steps={args.steps}", "batch_size=8", "image_size=128", "encoder=resnet_tiny", "image_every=0",
               f"checkpoint_every={args.steps}", f"num_workers={args.workers}",
               f"out_dir={args.root / f'run_{count}'}"]
        peaks[count] = peak_tree_memory(cmd)
        rows.append(f"| tcm-pretrain {args.steps} steps, {count} volumes, {args.workers} workers: peak RSS / PSS "
                    f"(sum over processes) | {peaks[count]['peak_rss'] / 2**20:.0f} / "
                    f"{peaks[count]['peak_pss'] / 2**20:.0f} MB | {_load()} |")
        print(rows[-1], flush=True)
    growth = (peaks[large]["peak_pss"] - peaks[small]["peak_pss"]) / 2**20
    rows.append(f"| growth of peak PSS, {small} -> {large} volumes | {growth:+.0f} MB | |")
    print(rows[-1], flush=True)
    corpus = PreparedCorpus(corpora[large])
    for dim, size, batch, encoder in ((2, 128, 8, "resnet_tiny"), (3, 96, 2, "resnet3d_tiny")):
        stream = _stream(corpus, dim, size)
        for workers in (0, args.workers):
            steps = 20 if dim == 2 else 6
            t = time.perf_counter()
            for _ in build_loader(stream, batch, 0, steps, num_workers=workers):
                pass
            rows.append(f"| loader {dim}-D {size}px batch {batch}, {workers} workers | "
                        f"{steps * batch / (time.perf_counter() - t):.1f} crops/s | {_load()} |")
            print(rows[-1], flush=True)
        cfg = PretrainConfig(method="spark", dataset=str(corpora[large]), encoder=encoder, image_size=size,
                             batch_size=batch, decoder_width=64 if dim == 2 else 16, steps=10 if dim == 2 else 8,
                             warmup_steps=1, image_every=0, checkpoint_every=1000, num_workers=args.workers,
                             out_dir=str(args.root / f"wait_{dim}d"))
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        trainer = Trainer(cfg)
        t = time.perf_counter()
        trainer.train(progress=False)
        total = time.perf_counter() - t
        rows.append(f"| model {encoder} {dim}-D {size}px batch {batch}: consumption | "
                    f"{cfg.steps * batch / total:.1f} crops/s | {_load()} |")
        rows.append(f"| ... share of the steps waiting for data ({args.workers} workers, {cfg.steps} steps, "
                    f"first batch included) | {100 * trainer.data_wait_s / total:.1f} % | |")
        print(rows[-2] + "\n" + rows[-1], flush=True)
    print("\n".join(lines + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
