"""Overlay PNGs: the image, the saliency (red) and the sampled mask (masked patches greyed out)."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import torch

from ._deps import require

SALIENCY_RGB = np.array([255, 40, 40], dtype=np.float32)
MASKED_RGB = np.array([40, 60, 110], dtype=np.float32)
CONTOUR_RGB = np.array([255, 220, 0], dtype=np.float32)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(gray, 0, 1)[..., None] * 255.0, 3, axis=-1)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return base * (1 - alpha[..., None]) + colour * alpha[..., None]


def _contour(region: np.ndarray) -> np.ndarray:
    """Pixels of ``region`` with a 4-neighbour outside it."""
    padded = np.pad(region, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return region & ~interior


def overlay_panels(image: np.ndarray, saliency: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """One 2-D slice -> uint8 [H, 2W, 3]: left the saliency on the image, right the mask.

    image float [H, W] in [0, 1]; saliency float [H, W] in [0, 1]; visible bool [H, W] (True = kept).
    On the right, masked patches are tinted dark blue and the saliency's 0.5 contour is yellow.
    """
    left = _blend(_rgb(image), SALIENCY_RGB, 0.6 * np.clip(saliency, 0, 1))
    right = _blend(_rgb(image), MASKED_RGB, np.where(visible, 0.0, 0.7))
    edge = _contour(saliency >= 0.5)
    right[edge] = CONTOUR_RGB
    gap = np.full((image.shape[0], 4, 3), 255.0)
    return np.concatenate([left, gap, right], axis=1).astype(np.uint8)


def volume_slices(volume_shape: tuple[int, ...], saliency: np.ndarray) -> dict[str, tuple[int, int]]:
    """Axial, coronal and sagittal slice indices through the saliency's centre of mass ([S, P, L] volumes)."""
    weights = np.clip(saliency, 0, None)
    centre = []
    for d, n in enumerate(volume_shape):
        marginal = weights.sum(axis=tuple(a for a in range(3) if a != d))
        total = float(marginal.sum())
        centre.append(int(round(float((np.arange(n) * marginal).sum()) / total)) if total > 0 else n // 2)
    return {"axial": (0, centre[0]), "coronal": (1, centre[1]), "sagittal": (2, centre[2])}


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    plane = np.take(volume, index, axis=axis)
    return plane[::-1] if axis != 0 else plane  # coronal/sagittal: superior at the top


def _resize(plane: np.ndarray, spacing: tuple[float, float], scale: float, order: int) -> np.ndarray:
    pil = require("PIL.Image", package="pillow", purpose="writing overlay PNGs")
    h, w = plane.shape[:2]
    base = min(spacing)
    size = (max(1, round(w * spacing[1] / base * scale)), max(1, round(h * spacing[0] / base * scale)))
    img = pil.fromarray(plane)
    return np.asarray(img.resize(size, pil.NEAREST if order == 0 else pil.BILINEAR))


def render_overlay(image: np.ndarray, saliency: torch.Tensor | np.ndarray, visible: torch.Tensor | np.ndarray,
                   spacing: tuple[float, ...], title: str, *, min_height: int = 256) -> np.ndarray:
    """uint8 RGB overlay of a 2-D image, or of three orthogonal slices of a 3-D [S, P, L] volume."""
    sal = saliency.numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    vis = visible.numpy() if isinstance(visible, torch.Tensor) else np.asarray(visible)
    if image.ndim == 2:
        planes = [("", image, sal, vis, tuple(spacing))]
    else:
        planes = []
        for name, (axis, index) in volume_slices(image.shape, sal).items():
            sp = tuple(s for a, s in enumerate(spacing) if a != axis)
            planes.append((f"{name} {index}", _take(image, axis, index), _take(sal, axis, index),
                           _take(vis, axis, index), sp))
    rows = []
    for label, img, s, v, sp in planes:
        panel = overlay_panels(img, s, v)
        scale = max(1.0, min_height / (img.shape[0] * sp[0] / min(sp)))
        rows.append((label, _resize(panel, sp, scale, order=0)))
    return _compose(rows, title)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """bool [H, W]: labelled pixels with a 4-neighbour of another label (every structure's contour)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre)
               | (padded[1:-1, 2:] != centre))
    return differs & (labels > 0)


def render_atlas_qc(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], title: str, *,
                    highlight: np.ndarray | None = None, min_height: int = 256) -> np.ndarray:
    """uint8 RGB quality-control view of a registration: warped atlas contours on the scan.

    Three orthogonal slices of a 3-D [S, P, L] ``image`` (float in [0, 1]) through the centre of
    ``highlight`` (else of the warped ``labels``, int [S, P, L]); each slice is shown plain (left) and with every label's contour
    (right: yellow, ``highlight`` bool [S, P, L] - e.g. the prompt's structures - in red), so a shifted or
    folded atlas is visible at a glance.
    """
    if image.ndim != 3 or labels.shape != image.shape:
        raise ValueError(f"render_atlas_qc: image and labels must be 3-D of one shape, got {image.shape} and "
                         f"{labels.shape}")
    rows = []
    centre_on = highlight if highlight is not None and highlight.any() else labels > 0
    for name, (axis, index) in volume_slices(image.shape, centre_on.astype(np.float32)).items():
        sp = tuple(s for a, s in enumerate(spacing) if a != axis)
        plane, lab = _take(image, axis, index), _take(labels, axis, index)
        right = _rgb(plane)
        right[label_edges(lab)] = CONTOUR_RGB
        if highlight is not None:
            right[_contour(_take(highlight, axis, index))] = SALIENCY_RGB
        panel = np.concatenate([_rgb(plane), np.full((plane.shape[0], 4, 3), 255.0), right], axis=1).astype(np.uint8)
        scale = max(1.0, min_height / (plane.shape[0] * sp[0] / min(sp)))
        rows.append((f"{name} {index}", _resize(panel, sp, scale, order=0)))
    return _compose(rows, title, legend="left: scan   right: atlas labels after registration (yellow), prompt (red)")


def _compose(rows: list[tuple[str, np.ndarray]], title: str, *,
             legend: str = "left: saliency (red)   right: masked patches (blue), ROI contour (yellow)") -> np.ndarray:
    pil = require("PIL.Image", package="pillow", purpose="writing overlay PNGs")
    draw_mod = require("PIL.ImageDraw", package="pillow", purpose="writing overlay PNGs")
    header = 18
    width = max(r.shape[1] for _, r in rows) + 8
    height = sum(r.shape[0] + header for _, r in rows) + header + 8
    chars = max(40, width // 6)  # the default bitmap font is ~6 px a character
    lines = textwrap.wrap(title, chars) or [""]
    height += header * (len(lines) - 1)
    canvas = pil.new("RGB", (width, height), (255, 255, 255))
    draw = draw_mod.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + header * i), line, fill=(0, 0, 0))
    y = header * len(lines)
    for label, row in rows:
        draw.text((4, y + 3), f"{label}  {legend}".strip(), fill=(60, 60, 60))
        canvas.paste(pil.fromarray(row), (4, y + header))
        y += row.shape[0] + header
    return np.asarray(canvas)


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    pil = require("PIL.Image", package="pillow", purpose="writing overlay PNGs")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.fromarray(rgb).save(path)
