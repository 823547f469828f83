"""Reorientation and resampling of volumes (numpy + scipy + nibabel)."""

from __future__ import annotations

import numpy as np

from .._deps import require

# Canonical 3-D layout of every volume this package returns: index increases toward
# Superior, Posterior, Left, so ``vol[k]`` is an axial slice with anterior at the top
# and the patient's right on the viewer's left (radiological convention).
CANONICAL_3D = ("S", "P", "L")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a NIfTI-style array [i, j, k] with a voxel->world (RAS mm) affine to [S, P, L].

    Returns:
        (array [S, P, L], spacing in mm along those axes).
    """
    orientations = require("nibabel.orientations", package="nibabel", purpose="reorienting a volume")
    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(("L", "P", "S")))
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing_lps = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(transform):
        spacing_lps[int(dst_axis)] = float(zooms[src_axis])
    lps = orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(lps.transpose(2, 1, 0)), tuple(spacing_lps[::-1])


def resample_affine(src: np.ndarray, src_affine: np.ndarray, out_affine: np.ndarray,
                    out_shape: tuple[int, ...], *, order: int) -> np.ndarray:
    """Sample ``src`` on the grid (out_affine, out_shape); order 0 for labels, 1 for images; 0 outside."""
    ndimage = require("scipy.ndimage", package="scipy", purpose="resampling a volume")
    to_src = np.linalg.inv(src_affine) @ out_affine
    return ndimage.affine_transform(src, to_src[:3, :3], to_src[:3, 3], output_shape=out_shape,
                                    order=order, mode="constant", cval=0)


def resample_spacing(array: np.ndarray, spacing: tuple[float, ...], target: float | tuple[float, ...],
                     *, order: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Zoom an array so each axis has the ``target`` spacing (mm); returns (array, actual spacing)."""
    ndimage = require("scipy.ndimage", package="scipy", purpose="resampling a volume")
    target_t = (float(target),) * array.ndim if np.isscalar(target) else tuple(float(t) for t in target)
    factors = [s / t for s, t in zip(spacing, target_t)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    actual = tuple(s * n / m for s, n, m in zip(spacing, array.shape, out.shape))
    return out, actual
