"""CLIPSeg (transformers) as a localizer, from a checkpoint directory the user already has."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._deps import require
from ..data.scan import LabelMap


class CLIPSegLocalizer:
    """Text-prompted segmentation with a local CLIPSeg checkpoint (e.g. a medical fine-tune).

    Nothing is downloaded: ``checkpoint`` must be a directory written by ``save_pretrained`` of
    ``CLIPSegForImageSegmentation`` and ``CLIPSegProcessor`` (``config.json``, weights, tokenizer
    and preprocessor files). 2-D images are segmented directly; 3-D volumes [D, H, W] slice by
    slice along the first axis (axial slices for the embedded volumes), ``batch_size`` at a time.

    Args:
        checkpoint: directory of the checkpoint.
        device: where the model runs (default CPU).
        batch_size: slices per forward pass for volumes.
        rgb: treat 3-D inputs [3, H, W] as one colour image instead of a 3-slice volume.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu",
                 batch_size: int = 16, rgb: bool = False) -> None:
        transformers = require("transformers", purpose="CLIPSegLocalizer")
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIPSegLocalizer: no CLIPSeg checkpoint at {path} (expected config.json, the weights and the "
                "processor files saved with save_pretrained); this package never downloads models, so copy a "
                "checkpoint such as CIDAS/clipseg-rd64-refined there first")
        self.processor = transformers.CLIPSegProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.CLIPSegForImageSegmentation.from_pretrained(str(path), local_files_only=True)
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.rgb = rgb
        self.cache_key = f"CLIPSegLocalizer({path.resolve()})"

    @torch.no_grad()
    def __call__(self, image, prompt: str, *, labels: LabelMap | None = None) -> torch.Tensor:
        """Saliency float32 [*S] in [0, 1] (sigmoid of CLIPSeg's logits, resized to S); ``labels`` is unused.

        image: [H, W], [D, H, W] (a volume, segmented slice by slice) or, with ``rgb=True``, [3, H, W].
        """
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 2:
            slices, out_shape = [array], array.shape
        elif array.ndim == 3 and self.rgb and array.shape[0] == 3:
            slices, out_shape = [np.moveaxis(array, 0, -1)], array.shape[1:]
        elif array.ndim == 3:
            slices, out_shape = list(array), array.shape
        else:
            raise ValueError(f"CLIPSegLocalizer: image must be [H, W], [D, H, W] or (rgb=True) [3, H, W], "
                             f"got {array.shape}")
        lo, hi = float(np.min(array)), float(np.max(array))
        rgb = [_to_rgb_uint8(s, lo, hi) for s in slices]
        maps = []
        for start in range(0, len(rgb), self.batch_size):
            chunk = rgb[start:start + self.batch_size]
            inputs = self.processor(text=[prompt] * len(chunk), images=chunk, padding=True, return_tensors="pt")
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
            logits = logits.reshape(len(chunk), 1, *logits.shape[-2:]).float()
            size = out_shape[-2:]
            maps.append(torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        saliency = torch.sigmoid(torch.cat(maps)[:, 0]).cpu()
        return saliency[0] if len(out_shape) == 2 else saliency


def _to_rgb_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if image.ndim == 3:  # already [H, W, 3]
        scaled = (image - lo) / max(hi - lo, 1e-6)
        return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    gray = (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
