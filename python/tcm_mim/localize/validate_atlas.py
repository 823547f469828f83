"""Validation of :class:`AtlasLocalizer`: known deformations of the atlases, Dice per structure, prompt mass.

    python -m tcm_mim.localize.validate_atlas --atlas brain_mri chest_ct --out atlas_validation.md

Each atlas is deformed by a known random affine plus a smooth random displacement field (scipy, not the
registration library's transform model), the atlas is registered back to the deformed image, and the
warped labels are compared with the truth (the atlas labels deformed by the same map).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import numpy as np

from .._deps import require
from ..data.scan import Scan

LARGE_CM3 = 5.0  # structures larger than this are held to the mean-Dice target


def deform_scan(scan: Scan, seed: int, *, rotation_deg: float = 6.0, scale: float = 0.06, shift_mm: float = 6.0,
                field_mm: float = 5.0, field_sigma_mm: float = 25.0) -> Scan:
    """``scan`` (image and labels) resampled through a known random map phi(x) = A x + u(x).

    A: rotations up to ``rotation_deg`` about each axis, per-axis scale in 1 +- ``scale`` and a shift up
    to ``shift_mm``, about the volume centre; u: Gaussian-smoothed noise (sigma ``field_sigma_mm``) scaled
    so its largest displacement is ``field_mm``. Image linear, labels nearest neighbour; outside is the
    image minimum.

    Returns:
        a Scan on the same grid and spacing, named ``<name>/deformed<seed>``, labels = the truth.
    """
    ndimage = require("scipy.ndimage", package="scipy", purpose="deform_scan")
    rng = np.random.default_rng(seed)
    spacing = np.asarray(scan.spacing, dtype=np.float64)
    shape = scan.image.shape
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = np.cos(angle)
        r[a, b], r[b, a] = -np.sin(angle), np.sin(angle)
        rot = rot @ r
    matrix = rot @ np.diag(1 + rng.uniform(-scale, scale, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) * spacing / 2
    mapped = (grid - centre) @ matrix.T + centre + shift
    # Smooth field on a coarse grid (4x fewer voxels per axis), then linearly upsampled: same smoothness, less work.
    coarse = tuple(max(n // 4, 2) for n in shape)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), field_sigma_mm / (4 * spacing.mean()))
                      for _ in range(3)], -1)
    field *= field_mm / max(np.abs(field).max(), 1e-12)
    zoom = [n / c for n, c in zip(shape, coarse)]
    field = np.stack([ndimage.zoom(field[..., i], zoom, order=1) for i in range(3)], -1)
    coords = ((mapped + field) / spacing).transpose(3, 0, 1, 2)
    image = ndimage.map_coordinates(scan.image, coords, order=1, mode="constant", cval=float(scan.image.min()))
    labels = ndimage.map_coordinates(scan.label_map, coords, order=0, mode="constant", cval=0)
    return dataclasses.replace(scan, name=f"{scan.name}/deformed{seed}", image=image.astype(np.float32),
                               label_map=labels.astype(scan.label_map.dtype))


def dice_per_label(pred: np.ndarray, truth: np.ndarray, ids) -> dict[int, float]:
    """{label id: Dice of pred == id and truth == id} (1.0 when both are empty)."""
    out = {}
    for i in ids:
        p, t = pred == i, truth == i
        total = int(p.sum()) + int(t.sum())
        out[int(i)] = 2.0 * int((p & t).sum()) / total if total else 1.0
    return out


def prompt_mass(saliency: np.ndarray, truth: np.ndarray, ids, opposite_ids) -> tuple[float, float]:
    """(share of the saliency mass inside the truth structures ``ids``, share inside ``opposite_ids``)."""
    total = float(saliency.sum())
    if total <= 0:
        return 0.0, 0.0
    inside = float(saliency[np.isin(truth, list(ids))].sum())
    other = float(saliency[np.isin(truth, list(opposite_ids))].sum())
    return inside / total, other / total


def write_nifti(path, image: np.ndarray, spacing: tuple[float, ...]) -> None:
    """Save a canonical [S, P, L] volume as NIfTI (RAS affine), so that ``read_scan`` gives it back as it was."""
    nib = require("nibabel", purpose="write_nifti")
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # [S, P, L] -> [L, P, S]; +L and +P are -x and -y in RAS.
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), affine), str(path))
