"""tcm-prepare, prepared corpora read through memory maps, the DataLoader, the embedded-cache rebuild."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch

from tcm_mim.data import (PreparedCorpus, PrepareSettings, crop_starts, embedded, embedded_corpus, load_embedded,
                          normalize_intensity, prepare_corpus, random_crop, read_crop, read_scan)
from tcm_mim.data import prepare as prepare_mod
from tcm_mim.data.prepare import decode_image, main as prepare_main, prepare_scans
from tcm_mim.data.scan import Scan
from tcm_mim.train import PretrainConfig, Trainer
from tcm_mim.train.loader import build_loader
from tcm_mim.train.stream import SliceStream, VolumeStream, _generator

from .test_data import _write_dicom_series, _write_nifti

SHAPE = (32, 32, 24)  # NIfTI [i, j, k]: canonical [S, P, L] = (24, 32, 32)


@pytest.fixture()
def raw(tmp_path):
    """A folder as FolderDataset reads it: two NIfTI CTs with labels, one DICOM series, one PNG, one corrupt file."""
    pil = pytest.importorskip("PIL.Image")
    src, labels = tmp_path / "src", tmp_path / "labels"
    src.mkdir(), labels.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        volume = rng.normal(40, 150, SHAPE).astype(np.float32)
        volume[0, 0, 0] = -1000  # read_scan calls a NIfTI with values below -500 CT
        seg = np.zeros(SHAPE, np.int16)
        seg[4:20, 6:18, 5:12] = 3
        seg[20:28, 6:18, 5:12] = 7
        _write_nifti(src / f"{name}.nii.gz", volume, zooms=(1.0, 1.0, 2.0))
        _write_nifti(labels / f"{name}.nii.gz", seg, zooms=(1.0, 1.0, 2.0))
    _write_dicom_series(src / "series", (rng.random((5, 20, 18)) * 1500).astype(np.uint16))
    pil.fromarray((rng.random((40, 36)) * 255).astype(np.uint8)).save(src / "xray.png")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream")
    (tmp_path / "names.txt").write_text("3 liver\n7 heart\n")
    return tmp_path


def _prepare(raw, out, **kw):
    return prepare_corpus(raw / "src", out, label_dir=raw / "labels", label_names=raw / "names.txt",
                          progress=False, **kw)


def test_prepare_writes_manifest_and_compact_arrays(raw):
    report = _prepare(raw, raw / "out", settings=PrepareSettings(dtype="float16"))
    assert report.prepared == 4 and report.skipped == 0
    assert [src for src, _ in report.failures] == ["broken.nii.gz"] and "could not read" in report.failures[0][1]
    manifest = json.loads((raw / "out" / "manifest.json").read_text())
    assert manifest["format"] == "tcm-corpus" and manifest["failures"][0]["source"] == "broken.nii.gz"
    rows = {r["source"]: r for r in manifest["scans"]}
    assert sorted(rows) == ["a.nii.gz", "b.nii.gz", "series", "xray.png"]
    a = rows["a.nii.gz"]
    assert a["shape"] == [24, 32, 32] and a["spacing"] == [2.0, 1.0, 1.0] and a["modality"] == "CT"
    assert a["label_names"] == {"3": "liver", "7": "heart"} and a["label_dtype"] == "|u1"  # smallest type
    assert len(a["digest"]) == 64 and a["digest"] != rows["b.nii.gz"]["digest"]
    assert rows["xray.png"]["shape"] == [40, 36] and rows["xray.png"]["labels"] is None
    assert rows["series"]["shape"] == [5, 20, 18] and rows["series"]["modality"] == "CT"
    corpus = PreparedCorpus(raw / "out")
    for i, row in enumerate(corpus.rows):
        source = read_scan(raw / "src" / row["source"])
        # The stored image is exactly the normalised volume of the reader, in float16.
        expected = normalize_intensity(source.image, source.modality).astype(np.float16)
        assert corpus.open(i).dtype == np.float16
        np.testing.assert_array_equal(corpus.open(i), expected)
    labels = corpus.open(0, "labels")
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) == {0, 3, 7}


def test_corpus_crops_equal_crops_of_the_loaded_volume(raw):
    _prepare(raw, raw / "out")  # uint8
    corpus = PreparedCorpus(raw / "out")
    full = [decode_image(np.load(raw / "out" / r["image"])) for r in corpus.rows]  # fully loaded, not mapped
    assert corpus.open(0).dtype == np.uint8
    gen = torch.Generator().manual_seed(0)
    for i, volume in enumerate(full):
        for size in ((8,) * volume.ndim, (48,) * volume.ndim):  # inside, and larger than the scan (zero padded)
            g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
            expected, _ = random_crop(torch.from_numpy(volume)[None], None, size, g1)
            got = corpus.crop(i, crop_starts(volume.shape, size, g2), size)
            np.testing.assert_array_equal(got, expected[0].numpy())
        starts = [int(torch.randint(-4, 4, (), generator=gen)) for _ in volume.shape]
        np.testing.assert_array_equal(corpus.crop(i, starts, (6,) * volume.ndim),
                                      read_crop(volume, starts, (6,) * volume.ndim))
    # The 2-D stream's items: the same draws on the fully loaded slice give the same crop, bit for bit.
    stream = SliceStream(corpus, 16, rotate_deg=0.0, scale=0.0, intensity=0.0, seed=5)
    for index in range(6):
        gen = _generator(5, index)
        s = int(torch.randint(len(full), (), generator=gen))
        k = stream.slices[s][int(torch.randint(len(stream.slices[s]), (), generator=gen))]
        plane = full[s] if k is None else full[s][k]
        expected, _ = random_crop(torch.from_numpy(plane)[None], None, (16, 16), gen)
        torch.testing.assert_close(stream.item(index)[0], expected, rtol=0, atol=0)


def test_interrupted_prepare_resumes(raw, monkeypatch):
    calls = []
    real = prepare_mod.prepare_scan

    def crash_on_third(*args, **kw):
        calls.append(args[1].name)
        if len(calls) == 3:
            # Die half way through writing: a truncated image and no meta.json are left behind.
            args[1].mkdir(parents=True, exist_ok=True)
            (args[1] / "image.npy").write_bytes(b"\x93NUMPY")
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(prepare_mod, "prepare_scan", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(raw, raw / "out")
    monkeypatch.setattr(prepare_mod, "prepare_scan", real)
    report = _prepare(raw, raw / "out")
    assert (report.prepared, report.skipped) == (2, 2)  # the two finished scans were kept
    assert len(PreparedCorpus(raw / "out").rows) == 4
    # Changed content is prepared again; unchanged scans are skipped.
    _write_nifti(raw / "src" / "b.nii.gz", np.full(SHAPE, -1000, np.float32), zooms=(1.0, 1.0, 2.0))
    report = _prepare(raw, raw / "out", workers=2)  # through the process pool
    assert (report.prepared, report.skipped) == (1, 3)
    b = [r for r in report.rows if r["source"] == "b.nii.gz"][0]
    assert not np.load(raw / "out" / b["image"]).any()
    # Other settings are another preparation of every scan.
    assert _prepare(raw, raw / "out", settings=PrepareSettings(window="lung")).prepared == 4


def test_prepare_cli_reports_and_exit_codes(raw, capsys):
    args = [str(raw / "src"), str(raw / "out"), "--label-dir", str(raw / "labels"), "--label-names",
            str(raw / "names.txt"), "--no-progress"]
    assert prepare_main(args) == 0
    out = capsys.readouterr().out
    assert "4 prepared, 0 already prepared (skipped), 1 failed" in out and "FAILED broken.nii.gz" in out
    assert prepare_main([*args, "--strict"]) == 1  # the corrupt file fails a strict run
    assert "0 prepared, 4 already prepared" in capsys.readouterr().out
    only_broken = raw / "only_broken"
    only_broken.mkdir()
    shutil.copy(raw / "src" / "broken.nii.gz", only_broken)
    assert prepare_main([str(only_broken), str(raw / "out2"), "--no-progress"]) == 1  # nothing prepared
    capsys.readouterr()
    assert prepare_main([str(raw / "src"), str(raw / "out3"), "--spacing", "-1"]) == 2  # one line, exit 2
    assert "tcm-prepare: error: argument --spacing: --spacing must be 1 to 3 values > 0" in capsys.readouterr().err
    assert prepare_main([str(raw / "missing"), str(raw / "out3")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_resampling_to_a_spacing_on_a_known_geometry(tmp_path):
    # [S, P, L] at 2 x 1 x 1 mm: a ramp of 10 HU per slice along S, a label block on slices 2 and 3.
    z = np.arange(6, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(10.0 * z, (6, 4, 4)).copy()
    labels = np.zeros((6, 4, 4), np.int16)
    labels[2:4] = 5
    scan = Scan("ramp", "CT", image, (2.0, 1.0, 1.0), ("S", "P", "L"), labels, {5: "block"})
    settings = PrepareSettings(spacing=(1.0,), window=(50.0, 100.0), dtype="float16")  # [0, 100] HU -> [0, 1]
    [row] = prepare_scans([scan], tmp_path, settings=settings)
    assert row["shape"] == [12, 4, 4] and row["spacing"] == [1.0, 1.0, 1.0]
    corpus = PreparedCorpus(tmp_path)
    out_labels = corpus.open(0, "labels")
    # Nearest neighbour: the block covers 2 mm .. 4 mm along S, i.e. the 1 mm slices 4 .. 7.
    assert (out_labels[4:8] == 5).all() and not out_labels[:4].any() and not out_labels[8:].any()
    # Linear: voxel j's centre (j + 0.5) mm lies at input index j / 2 - 0.25 (edges clamp to the end slices).
    expected = np.clip(10.0 * (np.arange(12) / 2 - 0.25), 0.0, 50.0) / 100.0
    # float16 storage: its 11-bit mantissa is the tolerance.
    np.testing.assert_allclose(np.asarray(corpus.open(0), np.float32)[:, 0, 0], expected, rtol=1e-3, atol=1e-3)


def test_loader_workers_are_bit_identical_and_shard_ranks(raw):
    _prepare(raw, raw / "out")
    corpus = PreparedCorpus(raw / "out")
    volumes = corpus.select([i for i, r in enumerate(corpus.rows) if len(r["shape"]) == 3])
    stream = VolumeStream(volumes, 16, seed=2)
    serial = list(build_loader(stream, 3, 0, 4, num_workers=0))
    parallel = list(build_loader(stream, 3, 0, 4, num_workers=2, prefetch_factor=1))
    assert len(serial) == len(parallel) == 4
    for (a, sa), (b, sb) in zip(serial, parallel):
        assert a.shape == (3, 1, 16, 16, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(sa, sb, rtol=0, atol=0)
    # Rank r of 2 gets the stream's batch 2 * step + r: the ranks see disjoint items.
    rank1 = list(build_loader(stream, 3, 1, 2, rank=1, world=2))
    torch.testing.assert_close(rank1[0][0], stream.batch(3, 3)[0], rtol=0, atol=0)
    resumed = list(build_loader(stream, 3, 2, 4, num_workers=2))  # a loader rebuilt at step 2
    torch.testing.assert_close(resumed[0][0], serial[2][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        build_loader(stream, 3, 0, 4, num_workers=-1)


def _losses(out_dir):
    with open(out_dir / "log.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_pretrain_on_a_prepared_corpus_resumes_exactly_with_two_workers(raw, localizer):
    _prepare(raw, raw / "corpus", prompts=["liver"], localizer=localizer)
    rows = PreparedCorpus(raw / "corpus").rows
    assert all(len(r["saliency"]) == 1 for r in rows if r["labels"] is not None)
    tiny = dict(method="tcm", dataset=str(raw / "corpus"), prompts=["liver"], encoder="resnet_tiny",
                decoder_width=16, image_size=32, batch_size=2, steps=4, warmup_steps=1, checkpoint_every=2,
                image_every=0)
    Trainer(PretrainConfig(out_dir=str(raw / "full"), num_workers=0, **tiny)).train(progress=False)
    cut = PretrainConfig(out_dir=str(raw / "cut"), num_workers=2, **tiny)
    Trainer(cut).train(progress=False, stop_after=2)
    Trainer(cut).train(resume=True, progress=False)
    assert _losses(raw / "cut") == _losses(raw / "full") and len(_losses(raw / "full")) == 4
    assert not (raw / "full" / "corpus").exists()  # a prepared corpus is read where it is
    assert not multiprocessing.active_children()  # train() stopped its loader's workers
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        PretrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor must be >= 1"):
        PretrainConfig(prefetch_factor=0)


def test_prepare_time_saliency_follows_the_content(raw, localizer):
    report = _prepare(raw, raw / "out", prompts=["liver", "femur"], localizer=localizer)
    assert any("no saliency for 'femur'" in w for w in report.warnings)  # no such label: reported, left out
    corpus = PreparedCorpus(raw / "out")
    a = [i for i, r in enumerate(corpus.rows) if r["source"] == "a.nii.gz"][0]
    [entry] = corpus.rows[a]["saliency"]
    sal = np.load(raw / "out" / entry["file"])
    liver = corpus.open(a, "labels") == 3
    assert sal.dtype == np.uint8 and sal[liver].min() >= 128 and sal[~liver].max() < 128
    # The liver moved in the source: the new content has a new key, and its saliency follows the new labels.
    seg = np.zeros(SHAPE, np.int16)
    seg[20:28, 20:30, 14:20] = 3
    _write_nifti(raw / "labels" / "a.nii.gz", seg, zooms=(1.0, 1.0, 2.0))
    _prepare(raw, raw / "out", prompts=["liver"], localizer=localizer)
    corpus = PreparedCorpus(raw / "out")
    [new] = corpus.rows[a]["saliency"]
    assert new["key"] != entry["key"] and not (raw / "out" / entry["file"]).exists()
    sal = np.load(raw / "out" / new["file"])
    liver = corpus.open(a, "labels") == 3
    assert sal[liver].min() >= 128 and sal[~liver].max() < 128


def test_corrupt_embedded_caches_are_rebuilt(tmp_path, monkeypatch, brain):
    monkeypatch.setenv("TCM_MIM_CACHE", str(tmp_path))
    embedded._brain_mri.cache_clear()
    try:
        load_embedded("brain_mri")  # builds the .npz in the temporary cache
        npz = next(tmp_path.glob("brain_mri_*.npz"))
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # a truncated download / full disk
        embedded._brain_mri.cache_clear()
        rebuilt = load_embedded("brain_mri")[0]  # no BadZipFile: detected and rebuilt
        np.testing.assert_array_equal(rebuilt.image, brain.image)
        with np.load(npz) as z:
            np.testing.assert_array_equal(z["0_image"], brain.image)
        corpus = embedded_corpus("brain_mri")  # prepared into the data cache on first use
        first = np.array(corpus.open(0))
        image = corpus.root / corpus.rows[0]["image"]
        image.write_bytes(image.read_bytes()[:200])  # a truncated prepared array
        again = embedded_corpus("brain_mri")
        np.testing.assert_array_equal(again.open(0), first)
        assert str(again.root).startswith(str(tmp_path))
    finally:
        embedded._brain_mri.cache_clear()


def test_embedded_corpus_falls_back_when_the_cache_is_read_only(tmp_path, monkeypatch):
    from tcm_mim.data import corpus as corpus_mod

    monkeypatch.setenv("TCM_MIM_CACHE", str(tmp_path / "cache"))
    real = corpus_mod.prepare_scans

    def read_only_cache(scans, out, **kw):
        if str(out).startswith(str(tmp_path / "cache" / "corpora")):
            raise PermissionError(13, "Permission denied", str(out))
        return real(scans, out, **kw)

    monkeypatch.setattr(corpus_mod, "prepare_scans", read_only_cache)
    corpus = embedded_corpus("chest_ct", fallback=tmp_path / "run" / "corpus")
    assert corpus.root == tmp_path / "run" / "corpus" and corpus.rows[0]["labels"] is not None
    with pytest.raises(PermissionError):
        embedded_corpus("chest_ct")


def test_prepare_with_a_user_localizer_covers_unlabelled_scans(raw):
    class Brightness:
        """A stand-in for an image-based localizer (CLIPSeg): saliency from the pixels, no labels needed."""

        cache_key = "brightness-v1"

        def __call__(self, image, prompt, *, labels=None):
            return torch.from_numpy((np.asarray(image) > 0.5).astype(np.float32))

    report = _prepare(raw, raw / "out", prompts=["bright"], localizer=Brightness())
    rows = {r["source"]: r for r in report.rows}
    assert all(len(r["saliency"]) == 1 for r in rows.values())  # the PNG without labels too
    corpus = PreparedCorpus(raw / "out")
    i = [k for k, r in enumerate(corpus.rows) if r["source"] == "xray.png"][0]
    sal = np.load(corpus.saliency_file(i, "bright", "brightness-v1"))
    np.testing.assert_array_equal(sal, np.where(decode_image(np.load(corpus.root / corpus.rows[i]["image"])) > 0.5,
                                                255, 0))
    # the CLIPSeg localizer needs a local checkpoint
    assert prepare_main([str(raw / "src"), str(raw / "out2"), "--prompts", "heart", "--localizer", "clipseg"]) == 2


class _DiesOnPhotos:
    """A localizer whose process dies on 2-D images: a worker killed mid-scan (as by the OOM killer)."""

    cache_key = "dies-on-photos"

    def __call__(self, image, prompt, *, labels=None):
        if np.asarray(image).ndim == 2:
            os._exit(1)
        return torch.zeros(np.asarray(image).shape)


def test_a_dead_worker_is_reported_and_the_rest_resumes(raw):
    report = _prepare(raw, raw / "out", workers=2, prompts=["x"], localizer=_DiesOnPhotos())
    died = [src for src, msg in report.failures if "worker process died" in msg]
    assert "xray.png" in died and (raw / "out" / "manifest.json").exists()
    again = _prepare(raw, raw / "out", workers=2)
    assert [src for src, _ in again.failures] == ["broken.nii.gz"] and len(again.rows) == 4
