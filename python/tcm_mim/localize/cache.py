"""Saliency computed once per (image, prompt, localizer), as TCM precomputes it offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..data.scan import LabelMap
from .base import Localizer


class SaliencyCache:
    """Memoises localizer outputs in memory and, if ``directory`` is given, on disk (one .pt a key).

    The key is (image_id, prompt, localizer.cache_key): give every image a stable id (a file path,
    ``Scan.name``) and the saliency of a dataset is computed once, on the first epoch or ahead of it.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, str, str], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(self, image_id: str, prompt: str, localizer: Localizer, image, *,
            labels: LabelMap | None = None) -> torch.Tensor:
        """The saliency of ``image`` for ``prompt``, computed with ``localizer`` only on a miss."""
        key = (str(image_id), prompt, getattr(localizer, "cache_key", type(localizer).__qualname__))
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
