"""Saliency computed once per (image content, prompt, localizer), as TCM precomputes it offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..data.scan import LabelMap
from .base import Localizer


def content_digest(image, labels: LabelMap | None = None) -> str:
    """SHA-256 (hex) of what a localizer sees: the image's dtype, shape and bytes, and the label map and names.

    Two calls agree exactly when the pixels, labels, label names and spacing agree, whatever the
    images are called, so a cache keyed on it never returns the saliency of changed data.
    """
    h = hashlib.sha256()
    for array in (image, None if labels is None else labels.array):
        if array is None:
            h.update(b"none")
            continue
        array = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    if labels is not None:
        h.update(repr((sorted(labels.names.items()), labels.spacing)).encode())
    return h.hexdigest()


class SaliencyCache:
    """Memoises localizer outputs in memory and, if ``directory`` is given, on disk (one .pt a key).

    The key is (content digest of image + labels, prompt, localizer.cache_key): changed pixels or
    labels are a different key, so a stale saliency is never returned, not even by a new process
    reading the directory. ``image_id`` only names the image in errors and logs. Hashing a large
    volume costs time; a caller that fetches the same scan repeatedly passes its ``digest``
    (computed once with :func:`content_digest`).
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, str, str], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(self, image_id: str, prompt: str, localizer: Localizer, image, *,
            labels: LabelMap | None = None, digest: str | None = None) -> torch.Tensor:
        """The saliency float32 [*S] of ``image`` [..., *S] for ``prompt``, computed with ``localizer`` only on a miss.

        Args:
            image_id: a readable name of the image (not part of the key).
            digest: ``content_digest(image, labels)`` if the caller has it; computed here otherwise.
        """
        if digest is None:
            digest = content_digest(image, labels)
        key = (digest, prompt, getattr(localizer, "cache_key", type(localizer).__qualname__))
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            saliency = torch.load(path, weights_only=True)
            self.hits += 1
        else:
            saliency = localizer(image, prompt, labels=labels)
            self.misses += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save(saliency, tmp)
                os.replace(tmp, path)
        self._memory[key] = saliency
        return saliency

    def _path(self, key: tuple[str, str, str]) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.pt"
