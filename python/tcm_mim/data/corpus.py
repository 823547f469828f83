"""A prepared corpus (written by ``tcm-prepare``) read crop by crop through memory maps.

Every read maps the scan's ``.npy`` (``np.load(mmap_mode="r")``), copies the crop's box and
drops the map, so a crop costs the pages it touches and the resident memory of a reader does
not grow with the number or size of the scans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .prepare import FORMAT, FORMAT_VERSION, MANIFEST, decode_image, prepare_scans
from .scan import Scan


def crop_starts(shape: Sequence[int], size: Sequence[int], gen: torch.Generator) -> list[int]:
    """Random crop origins, drawn exactly as :func:`tcm_mim.data.random_crop` draws them.

    An axis shorter than the crop is centred in it (zero padding), as ``random_crop`` pads it:
    its origin is then negative. Returns one origin per axis, in the array's coordinates.
    """
    starts = []
    for s, t in zip(shape, size):
        pad = max(t - s, 0)
        starts.append(int(torch.randint(s + pad - t + 1, (), generator=gen)) - pad // 2)
    return starts


def read_crop(array, starts: Sequence[int], size: Sequence[int], *, view: tuple = ()) -> np.ndarray:
    """``array[view][starts : starts + size]`` with zeros outside ``array[view]``; reads only that box.

    Args:
        array: a numpy array or memmap; ``view`` first takes a view of it (basic indexing, no read:
            ``(k,)`` for slice k, ``(slice(lo, hi),)`` for a slab) of shape S.
        starts, size: origin (may be negative) and size of the box along S.
    """
    array = array[view] if view else array
    shape = array.shape
    lo = [min(max(a, 0), s) for a, s in zip(starts, shape)]
    hi = [max(min(a + t, s), 0) for a, t, s in zip(starts, size, shape)]
    region = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi))])
    if region.shape == tuple(size):
        return region
    out = np.zeros(tuple(size), dtype=region.dtype)
    out[tuple(slice(a - s0, b - s0) for a, b, s0 in zip(lo, hi, starts))] = region
    return out


class PreparedCorpus:
    """The scans of a prepared corpus: manifest rows, crops read through memory maps, whole scans on demand.

    Args:
        root: a folder written by ``tcm-prepare`` (or :func:`prepare_embedded`).

    Attributes:
        rows: the manifest's rows (dicts: id, source, shape, spacing, modality, label_names, digest, ...).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"PreparedCorpus: {self.root} has no {MANIFEST}; prepare it first with "
                                    f"`tcm-prepare SRC {self.root}`")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"PreparedCorpus: {path} is format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; "
                             f"prepare it again with tcm-prepare")
        self.manifest = manifest
        self.rows: list[dict] = manifest["scans"]
        if not self.rows:
            raise ValueError(f"PreparedCorpus: {path} lists no scans (failures: {manifest.get('failures')})")

    def select(self, indices: Sequence[int]) -> PreparedCorpus:
        """A view of the same corpus with only the rows ``indices`` (in that order)."""
        view = object.__new__(PreparedCorpus)
        view.root, view.manifest = self.root, self.manifest
        view.rows = [self.rows[i] for i in indices]
        return view

    @staticmethod
    def is_corpus(path: str | os.PathLike) -> bool:
        """True if ``path`` is a folder holding a corpus manifest."""
        return (Path(path) / MANIFEST).is_file()

    def __len__(self) -> int:
        return len(self.rows)

    def shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.rows[index]["shape"])

    def open(self, index: int, what: str = "image") -> np.ndarray:
        """The memory-mapped array of scan ``index``: ``what`` = "image" (stored dtype) or "labels"."""
        rel = self.rows[index][what]
        if rel is None:
            raise ValueError(f"PreparedCorpus: scan {self.rows[index]['source']} has no {what}")
        return np.load(self.root / rel, mmap_mode="r")

    def saliency_file(self, index: int, prompt: str, localizer_key: str) -> Path | None:
        """The stored saliency (uint8 .npy) of scan ``index`` for (prompt, localizer), or None."""
        for entry in self.rows[index]["saliency"]:
            if entry["prompt"] == prompt and entry["localizer"] == localizer_key:
                return self.root / entry["file"]
        return None

    def crop(self, index: int, starts: Sequence[int], size: Sequence[int], *, view: tuple = ()) -> np.ndarray:
        """float32 [*size] in [0, 1]: a box of the image of scan ``index`` (zeros outside; see :func:`read_crop`)."""
        return decode_image(read_crop(self.open(index), starts, size, view=view))

    def saliency_crop(self, index: int, prompt: str, localizer_key: str, starts: Sequence[int],
                      size: Sequence[int], *, view: tuple = ()) -> np.ndarray | None:
        """float32 [*size] in [0, 1] of the stored saliency, or None if none is stored for that prompt."""
        path = self.saliency_file(index, prompt, localizer_key)
        if path is None:
            return None
        return read_crop(np.load(path, mmap_mode="r"), starts, size, view=view).astype(np.float32) / 255.0

    def scan(self, index: int) -> Scan:
        """Scan ``index`` loaded whole: image float32 [*S] in [0, 1] (as prepared), labels, names, spacing."""
        row = self.rows[index]
        labels = np.load(self.root / row["labels"]) if row["labels"] is not None else None
        return Scan(row["source"], row["modality"], decode_image(np.load(self.root / row["image"])),
                    tuple(row["spacing"]), tuple(row["orientation"]), labels,
                    {int(k): v for k, v in row["label_names"].items()})


def embedded_corpus(name: str, *, fallback: str | os.PathLike | None = None) -> PreparedCorpus:
    """The embedded dataset ``name`` as a prepared corpus in the data cache (prepared on first use).

    Lives in ``cache_dir()/corpora/<name>_<cache version>``; a scan whose files are missing,
    truncated or from other content is prepared again (so is a corrupt ``.npz`` it is built from).
    If the cache cannot be written (a read-only home), it is prepared into ``fallback`` instead.
    ``chest_xray`` holds the DRRs that project only the chest-CT slices pretraining may read
    (:func:`~tcm_mim.data.embedded.chest_xray_pretraining`), in ``corpora/chest_xray_pretrain_<version>``.
    """
    from .embedded import _CACHE_VERSION, cache_dir, chest_xray_pretraining, load_embedded

    scans = chest_xray_pretraining() if name == "chest_xray" else load_embedded(name)
    folder = "chest_xray_pretrain" if name == "chest_xray" else name
    out = cache_dir() / "corpora" / f"{folder}_{_CACHE_VERSION}"
    try:
        # prepare_scans keeps every complete scan of the same content and prepares the others again.
        prepare_scans(scans, out, source=f"embedded:{name}")
    except PermissionError:
        if fallback is None:
            raise
        out = Path(fallback)
        prepare_scans(scans, out, source=f"embedded:{name}")
    return PreparedCorpus(out)
