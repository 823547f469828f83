"""``tcm-prepare SRC OUT``: turn a folder of scans into a prepared corpus read through memory maps.

A prepared corpus is a folder::

    OUT/manifest.json                      format, settings, one row per scan, the failures
    OUT/scans/<id>/image.npy               uint8 (or float16) [*S]: the normalised image, [0, 1] scaled
    OUT/scans/<id>/labels.npy              the smallest integer type holding the label ids (when labelled)
    OUT/scans/<id>/saliency/<key>.npy      uint8 [*S]: saliency * 255 of one prompt (key: see below)
    OUT/scans/<id>/meta.json               the scan's manifest row, written last: the scan is complete

Each scan is read as :func:`tcm_mim.data.read_scan` reads it (volumes in the canonical [S, P, L]
layout), optionally resampled to a target spacing with ``scipy.ndimage.zoom`` (linear for
images, nearest neighbour for labels), normalised per modality with
:func:`tcm_mim.data.normalize_intensity`, and stored as ``.npy``: ``np.load(mmap_mode="r")``
maps it, so a crop reads only its own pages, with numpy alone (zarr would add a dependency and
chunk decompression per crop for no gain on local disks, where the files are read uncompressed).

The saliency of a scan for a prompt is keyed by SHA-256 of (content digest, settings digest,
``localizer.cache_key``, prompt): a changed file is a new digest, so it never meets old saliency.
Every file is written to a temporary name and renamed; a scan whose ``meta.json`` records the same
content digest and settings is skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from .folder import _kind, _label_path, read_label_names, read_scan
from .geometry import resample_spacing
from .scan import LabelMap, Scan
from .transforms import CT_WINDOWS, normalize_intensity

FORMAT = "tcm-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_DTYPES = ("uint8", "float16")
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What turns a scan into its prepared arrays (part of every scan's key).

    Attributes:
        spacing: target mm per voxel: one value for every axis, or one per axis (a 2-D image given
            three uses the last two); None keeps each scan's own spacing.
        modality: overrides the DICOM tag / the guess of :func:`read_scan` ("CT", "MR", "CR", ...).
        window: CT window, a name of ``CT_WINDOWS`` or (level, width) in HU; other modalities use
            the 0.5-99.5 percentiles of their nonzero intensities.
        dtype: "uint8" (round(255 x), 1/255 steps: 1.6 HU in the soft-tissue window) or "float16".
    """

    spacing: tuple[float, ...] | None = None
    modality: str | None = None
    window: str | tuple[float, float] = "soft_tissue"
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.dtype not in IMAGE_DTYPES:
            raise UserError(f"PrepareSettings: dtype must be one of {IMAGE_DTYPES}, got {self.dtype!r}")
        if isinstance(self.window, str) and self.window not in CT_WINDOWS:
            raise UserError(f"PrepareSettings: window must be one of {sorted(CT_WINDOWS)} or (level, width), "
                             f"got {self.window!r}")
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if not spacing or len(spacing) > 3 or min(spacing) <= 0:
                raise UserError(f"PrepareSettings: spacing must be 1 to 3 values > 0 (mm), got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        if not isinstance(self.window, str):
            object.__setattr__(self, "window", tuple(float(v) for v in self.window))

    def as_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "spacing": self.spacing, "modality": self.modality,
                "window": self.window, "dtype": self.dtype}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class PrepareReport:
    """What one ``prepare_corpus`` call did: the rows written, the scans skipped and what failed."""

    out: Path
    rows: list[dict]
    prepared: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"tcm-prepare: {self.prepared} prepared, {self.skipped} already prepared (skipped), "
                 f"{len(self.failures)} failed -> {self.out / MANIFEST}"]
        lines += [f"  FAILED {src}: {msg}" for src, msg in self.failures]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- encoding

def encode_image(normalised: np.ndarray, dtype: str) -> np.ndarray:
    """float [0, 1] -> the stored dtype ("uint8": round(255 x); "float16")."""
    if dtype == "uint8":
        return np.rint(np.clip(normalised, 0.0, 1.0) * 255.0).astype(np.uint8)
    return normalised.astype(np.float16)


def decode_image(stored: np.ndarray) -> np.ndarray:
    """The stored image (uint8 or float16) -> float32 in [0, 1]."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) * np.float32(1.0 / 255.0)
    return stored.astype(np.float32)


def label_dtype(label_map: np.ndarray) -> np.dtype:
    """The smallest integer dtype holding every id of ``label_map`` (uint8 for up to 255 labels)."""
    if label_map.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(label_map.min()), int(label_map.max())
    return np.promote_types(np.min_scalar_type(lo), np.min_scalar_type(hi))


# ---------------------------------------------------------------------------------------------- files

def _atomic_npy(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def valid_npy(path: Path, shape: Sequence[int], dtype: str | None = None) -> bool:
    """True if ``path`` is a complete .npy of that shape (and dtype): a truncated file fails to map."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return tuple(array.shape) == tuple(shape) and (dtype is None or array.dtype == np.dtype(dtype))


def source_digest(*paths: Path | None, extra: str = "") -> str:
    """SHA-256 of the bytes of the files (a folder: its files in name order, with their names) and ``extra``."""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            h.update(b"\0none")
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(b"\0" + file.relative_to(path).as_posix().encode() if path.is_dir() else b"\0")
            with open(file, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
    h.update(extra.encode())
    return h.hexdigest()


def scan_id(relative: str) -> str:
    """A folder name for a scan: its readable stem plus 8 hex digits of its relative path (unique)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", relative.split("/")[-1].split(".")[0])[:48] or "scan"
    return f"{stem}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}"


def saliency_key(digest: str, settings_digest: str, localizer_key: str, prompt: str) -> str:
    return hashlib.sha256("\x1f".join((digest, settings_digest, localizer_key, prompt)).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- one scan

def _target_spacing(settings: PrepareSettings, ndim: int) -> tuple[float, ...] | None:
    if settings.spacing is None:
        return None
    spacing = settings.spacing
    if len(spacing) == 1:
        return spacing * ndim
    if len(spacing) == 3 and ndim == 2:
        return spacing[1:]
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {ndim}-D image")
    return spacing


def prepare_scan(scan: Scan, scan_dir: Path, settings: PrepareSettings, *, source: str, label_source: str | None,
                 digest: str) -> dict:
    """Resample, normalise, encode and write one scan; returns its manifest row (also in ``meta.json``).

    Args:
        scan: image in native units [*S] (CT in HU), optional label map [*S] and names.
        scan_dir: ``OUT/scans/<id>``; replaced if it holds an older version.
    """
    if scan_dir.exists():
        shutil.rmtree(scan_dir)
    scan_dir.mkdir(parents=True)
    image, spacing = scan.image, tuple(float(s) for s in scan.spacing)
    labels = scan.label_map
    target = _target_spacing(settings, image.ndim)
    if target is not None:
        image, new_spacing = resample_spacing(image, spacing, target, order=1)
        if labels is not None:
            labels, _ = resample_spacing(labels, spacing, target, order=0)
        spacing = tuple(float(s) for s in new_spacing)
    stored = encode_image(normalize_intensity(image, scan.modality, window=settings.window), settings.dtype)
    _atomic_npy(stored, scan_dir / "image.npy")
    row = {"id": scan_dir.name, "source": source, "label_source": label_source, "digest": digest,
           "settings_digest": settings.digest, "shape": list(stored.shape), "spacing": list(spacing),
           "modality": scan.modality, "orientation": list(scan.orientation), "dtype": settings.dtype,
           "image": f"scans/{scan_dir.name}/image.npy", "labels": None, "label_dtype": None, "label_names": {},
           "saliency": []}
    if labels is not None:
        labels = np.asarray(labels)
        kept = labels.astype(label_dtype(labels))
        _atomic_npy(kept, scan_dir / "labels.npy")
        row.update(labels=f"scans/{scan_dir.name}/labels.npy", label_dtype=kept.dtype.str,
                   label_names={str(k): v for k, v in sorted(scan.label_names.items())})
    _atomic_json(row, scan_dir / "meta.json")
    return row


def row_is_complete(out: Path, row: dict, digest: str, settings: PrepareSettings) -> bool:
    """The scan in ``row`` was prepared from this content with these settings, and its files are whole."""
    return (row.get("digest") == digest and row.get("settings_digest") == settings.digest
            and valid_npy(out / row["image"], row["shape"])
            and (row["labels"] is None or valid_npy(out / row["labels"], row["shape"]))
            and all(valid_npy(out / s["file"], row["shape"], "uint8") for s in row["saliency"]))


def _read_meta(scan_dir: Path) -> dict | None:
    try:
        return json.loads((scan_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def add_saliency(out: Path, row: dict, prompts: Sequence[str], localizer) -> tuple[dict, list[str]]:
    """Compute and store the saliency of ``row``'s scan for each prompt it lacks (uint8, beside the scan).

    The localizer sees the prepared image (float [0, 1]) and label map with the prepared spacing.
    A prompt the localizer cannot place (LabelTextLocalizer: no label name matches) is left out
    and returned as a warning; a scan without labels gets none from a label-based localizer.

    Returns:
        (the updated row, also rewritten to ``meta.json``; warnings).
    """
    key_of = getattr(localizer, "cache_key", type(localizer).__qualname__)
    have = {(s["prompt"], s["localizer"]) for s in row["saliency"]}
    missing = [p for p in dict.fromkeys(prompts) if (p, key_of) not in have]
    if not missing:
        return row, []
    image = decode_image(np.load(out / row["image"]))
    labels = None
    if row["labels"] is not None:
        labels = LabelMap(np.load(out / row["labels"]), {int(k): v for k, v in row["label_names"].items()},
                          tuple(row["spacing"]))
    warnings = []
    sal_dir = out / "scans" / row["id"] / "saliency"
    sal_dir.mkdir(exist_ok=True)
    entries = list(row["saliency"])
    for prompt in missing:
        try:
            if getattr(localizer, "needs_geometry", False):  # AtlasLocalizer: registers with spacing and modality
                saliency = localizer(Scan(row["source"], row["modality"], image, tuple(row["spacing"])), prompt)
            else:
                saliency = localizer(image, prompt, labels=labels)
        except ValueError as err:  # the localizer's documented "cannot place this prompt here"
            warnings.append(f"{row['source']}: no saliency for {prompt!r}: {err}")
            continue
        saliency = np.asarray(saliency, dtype=np.float32)
        if saliency.shape != tuple(row["shape"]):
            raise ValueError(f"localizer {key_of} returned saliency of shape {saliency.shape} for an image of "
                             f"shape {tuple(row['shape'])}")
        key = saliency_key(row["digest"], row["settings_digest"], key_of, prompt)
        _atomic_npy(np.rint(np.clip(saliency, 0, 1) * 255).astype(np.uint8), sal_dir / f"{key}.npy")
        entries.append({"prompt": prompt, "localizer": key_of, "key": key,
                        "file": f"scans/{row['id']}/saliency/{key}.npy"})
    row = {**row, "saliency": entries}
    _atomic_json(row, out / "scans" / row["id"] / "meta.json")
    return row, warnings


# ---------------------------------------------------------------------------------------------- a folder

@dataclasses.dataclass(frozen=True)
class _Task:
    entry: Path
    relative: str
    label_path: Path | None
    label_names: Path | None  # the "id name" file, or None
    out: Path


_WORKER_STATE: dict = {}


def _set_state(settings: PrepareSettings, prompts: tuple[str, ...], localizer) -> None:
    _WORKER_STATE.update(settings=settings, prompts=prompts, localizer=localizer)


def _init_worker(settings: PrepareSettings, prompts: tuple[str, ...], localizer) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: threads inside would oversubscribe
    _set_state(settings, prompts, localizer)


def _run_task(task: _Task) -> tuple[str, dict | str, bool, list[str]]:
    """("ok", row, skipped, warnings) or ("error", message, False, [])."""
    settings, prompts, localizer = (_WORKER_STATE[k] for k in ("settings", "prompts", "localizer"))
    try:
        warnings: list[str] = []
        label_path = task.label_path
        if label_path is not None and not label_path.exists():
            warnings.append(f"{task.relative}: no label map (expected {label_path}); prepared without labels")
            label_path = None
        digest = source_digest(task.entry, label_path, task.label_names, extra=f"modality={settings.modality}")
        scan_dir = task.out / "scans" / scan_id(task.relative)
        row = _read_meta(scan_dir)
        skipped = row is not None and row_is_complete(task.out, row, digest, settings)
        if not skipped:
            scan = read_scan(task.entry, modality=settings.modality)
            if label_path is not None:
                label_map = np.rint(read_scan(label_path).image).astype(np.int64)
                if label_map.shape != scan.image.shape:
                    raise ValueError(f"label map {label_path} has shape {label_map.shape}, but the image has "
                                     f"{scan.image.shape}")
                scan = dataclasses.replace(scan, label_map=label_map,
                                           label_names=read_label_names(task.label_names, label_map))
            row = prepare_scan(scan, scan_dir, settings, source=task.relative,
                               label_source=None if label_path is None else str(label_path), digest=digest)
        # A label-based localizer has nothing to match on a scan without labels.
        if prompts and (row["labels"] is not None or not _label_based(localizer)):
            row, more = add_saliency(task.out, row, prompts, localizer)
            warnings += more
        return "ok", row, skipped, warnings
    except Exception as err:  # noqa: BLE001 - every failure of one file is reported, and the others go on
        return "error", f"{type(err).__name__}: {err}", False, []


def _label_based(localizer) -> bool:
    from ..localize import LabelTextLocalizer

    return isinstance(localizer, LabelTextLocalizer)


def _entries(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if _kind(p) is not None)


def prepare_corpus(src: str | os.PathLike, out: str | os.PathLike, *, label_dir: str | os.PathLike | None = None,
                   label_names: str | os.PathLike | None = None, settings: PrepareSettings | None = None,
                   workers: int = 1, prompts: Sequence[str] = (), localizer=None,
                   progress: bool = True) -> PrepareReport:
    """Prepare every scan under ``src`` (what :class:`FolderDataset` reads) into the corpus ``out``.

    Args:
        src: folder of NIfTI files, DICOM files or series folders, PNG/JPEG images.
        out: the corpus folder (created; an existing corpus is resumed: unchanged scans are skipped).
        label_dir, label_names: label maps with the images' names, and a text file of "id name" lines.
        settings: :class:`PrepareSettings` (default: own spacing, modality guessed, soft-tissue window, uint8).
        workers: processes (1: in this process).
        prompts: saliency to store per scan; ``localizer`` default :class:`LabelTextLocalizer`.

    Returns:
        A :class:`PrepareReport`; the manifest lists the scans prepared now or before, sorted by source.
    """
    src, out = Path(src), Path(out)
    settings = settings or PrepareSettings()
    if not src.is_dir():
        raise UserError(f"tcm-prepare: SRC {src} is not a folder")
    if workers < 1:
        raise UserError(f"tcm-prepare: workers must be >= 1, got {workers}")
    entries = _entries(src)
    if not entries:
        raise UserError(f"tcm-prepare: no images under {src} (looked for .nii, .nii.gz, .dcm files, folders of "
                         ".dcm files, .png, .jpg, .jpeg)")
    if prompts and localizer is None:
        from ..localize import LabelTextLocalizer

        localizer = LabelTextLocalizer()
    names_path = Path(label_names) if label_names is not None else None
    if names_path is not None and not names_path.is_file():
        raise UserError(f"tcm-prepare: label_names {names_path} is not a file")
    out.mkdir(parents=True, exist_ok=True)
    tasks = [_Task(e, e.relative_to(src).as_posix(), None if label_dir is None else _label_path(Path(label_dir), e),
                   names_path, out) for e in entries]
    report = PrepareReport(out, [])
    init = (settings, tuple(prompts), localizer)
    bar = _progress(len(tasks), progress)
    results = []
    if workers == 1:
        _set_state(*init)  # in this process: its thread count stays as it is
        for task in tasks:
            results.append((task, _run_task(task)))
            if bar is not None:
                bar.update(1)
    else:
        with concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init) as pool:
            futures = {pool.submit(_run_task, t): t for t in tasks}
            for future in concurrent.futures.as_completed(futures):
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool as err:
                    # A worker was killed (out of memory on a huge volume, a crash in a reader library):
                    # this and every unfinished scan are reported; a rerun resumes after the finished ones.
                    result = ("error", f"a worker process died before this scan was done ({err})", False, [])
                results.append((futures[future], result))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    for task, (status, payload, skipped, warnings) in sorted(results, key=lambda r: r[0].relative):
        if status == "error":
            report.failures.append((task.relative, payload))
            continue
        report.rows.append(payload)
        report.skipped += skipped
        report.prepared += not skipped
        report.warnings += warnings
    write_manifest(out, report.rows, settings, failures=report.failures, source=str(src.resolve()))
    return report


def write_manifest(out: Path, rows: list[dict], settings: PrepareSettings, *, failures=(), source: str = "") -> Path:
    """Write ``OUT/manifest.json`` atomically: format, settings, rows, failures."""
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "settings": settings.as_dict(),
                "settings_digest": settings.digest, "scans": rows,
                "failures": [{"source": s, "error": e} for s, e in failures]}
    _atomic_json(manifest, out / MANIFEST)
    return out / MANIFEST


def ensure_saliency(out: str | os.PathLike, prompts: Sequence[str], localizer,
                    only: Collection[str] | None = None) -> list[str]:
    """Store the saliency of every labelled scan of the corpus ``out`` for ``prompts`` where it is missing.

    What the trainer runs before it reads a corpus prepared without these prompts (or this
    localizer); later runs find it stored. Rewrites the manifest; returns the warnings.
    ``only``: the row ids to consider (the scans a run reads: held-out test scans are left alone).

    Raises:
        UserError (a ValueError): a prompt got no saliency on any scan (the localizer's reasons are in the message).
    """
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    key = getattr(localizer, "cache_key", type(localizer).__qualname__)
    rows, warnings = [], []
    for row in manifest["scans"]:
        if only is not None and row["id"] not in only:
            rows.append(row)
            continue
        if row["labels"] is not None or not _label_based(localizer):
            row, new = add_saliency(out, row, prompts, localizer)
            warnings += new
        rows.append(row)
    if rows != manifest["scans"]:
        _atomic_json({**manifest, "scans": rows}, out / MANIFEST)
    placed = {s["prompt"] for row in rows if only is None or row["id"] in only
              for s in row["saliency"] if s["localizer"] == key}
    unplaced = [p for p in prompts if p not in placed]
    if unplaced:
        raise UserError(f"no scan of {out} has saliency for the prompt(s) {unplaced}: " + "; ".join(warnings[:3]))
    return warnings


def prepare_scans(scans: Sequence[Scan], out: str | os.PathLike, *, settings: PrepareSettings | None = None,
                  source: str = "") -> list[dict]:
    """Prepare in-memory scans (the embedded datasets) into the corpus ``out``; complete scans are kept.

    Each scan's key is the digest of its arrays and names, so a scan rebuilt with other content
    (or a corrupt/truncated file in ``out``) is prepared again.
    """
    from ..localize.cache import content_digest

    out = Path(out)
    settings = settings or PrepareSettings()
    rows = []
    for scan in scans:
        digest = content_digest(scan.image, scan.labels) + hashlib.sha256(scan.modality.encode()).hexdigest()[:8]
        scan_dir = out / "scans" / scan_id(scan.name)
        row = _read_meta(scan_dir)
        if row is None or not row_is_complete(out, row, digest, settings):
            row = prepare_scan(scan, scan_dir, settings, source=scan.name, label_source=None, digest=digest)
        rows.append(row)
    write_manifest(out, rows, settings, source=source)
    return rows


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="scan", dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- CLI

def _parse_spacing(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--spacing must be mm values like 1.5 or 2,1,1, got {text!r}") from None
    if not 1 <= len(values) <= 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--spacing must be 1 to 3 values > 0, got {text!r}")
    return values


def _parse_window(text: str) -> str | tuple[float, float]:
    if text in CT_WINDOWS:
        return text
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window must be one of {sorted(CT_WINDOWS)} or LEVEL,WIDTH in HU, "
                                         f"got {text!r}") from None
    return level, width


def _parser() -> argparse.ArgumentParser:
    from ..cli.common import ArgumentParser

    p = ArgumentParser(prog="tcm-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of NIfTI files, DICOM files or series folders, PNG/JPEG images")
    p.add_argument("out", help="the prepared corpus folder (an existing one is resumed)")
    p.add_argument("--label-dir", help="label maps with the images' names (NIfTI, DICOM, PNG)")
    p.add_argument("--label-names", help='text file of "id name" lines naming the labels')
    p.add_argument("--spacing", type=_parse_spacing, help="resample to this spacing in mm: 1.5 or 2,1,1 "
                   "([S, P, L]); linear for images, nearest neighbour for labels")
    p.add_argument("--modality", help="override the modality of every scan (CT, MR, CR, ...)")
    p.add_argument("--window", type=_parse_window, default="soft_tissue",
                   help=f"CT window: one of {sorted(CT_WINDOWS)} or LEVEL,WIDTH (default soft_tissue)")
    p.add_argument("--dtype", choices=IMAGE_DTYPES, default="uint8", help="stored image type (default uint8)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--prompts", nargs="+", default=(), help="store the saliency of each scan for these prompts")
    p.add_argument("--localizer", choices=("label", "atlas", "clipseg"), default="label",
                   help="label: LabelTextLocalizer (needs --label-dir); atlas: AtlasLocalizer(--atlas), unlabelled "
                        "volumes; clipseg: CLIPSegLocalizer(--checkpoint)")
    p.add_argument("--atlas", choices=("brain_mri", "chest_ct"), help="for --localizer atlas: the atlas to register")
    p.add_argument("--checkpoint", help="local CLIPSeg checkpoint folder (for --localizer clipseg)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file fails (default: only if none prepared)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tcm-prepare``: 0 on success, 1 if nothing was prepared (or, with --strict, any
    failure), 2 for a user error (one line on stderr)."""
    from ..cli.common import run

    return run("tcm-prepare", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    localizer = None
    if args.prompts and args.localizer == "clipseg":
        if not args.checkpoint:
            parser.error("--localizer clipseg needs --checkpoint (a local CLIPSeg folder)")
        from ..localize import CLIPSegLocalizer

        localizer = CLIPSegLocalizer(args.checkpoint)
    elif args.prompts and args.localizer == "atlas":
        if not args.atlas:
            parser.error("--localizer atlas needs --atlas (brain_mri or chest_ct)")
        from ..localize import AtlasLocalizer

        # The warped labels are cached by content beside the corpus: a resumed run does not register again.
        localizer = AtlasLocalizer(args.atlas, cache_dir=Path(args.out) / "atlas_cache")
    elif args.prompts and args.label_dir is None:
        parser.error("--prompts with the label localizer needs --label-dir (it matches prompts to label names)")
    settings = PrepareSettings(spacing=args.spacing, modality=args.modality, window=args.window, dtype=args.dtype)
    report = prepare_corpus(args.src, args.out, label_dir=args.label_dir, label_names=args.label_names,
                            settings=settings, workers=args.workers, prompts=args.prompts, localizer=localizer,
                            progress=not args.no_progress)
    print(report.summary())
    if not report.rows or (args.strict and report.failures):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
