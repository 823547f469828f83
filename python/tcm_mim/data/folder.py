"""A user's own images: NIfTI volumes, DICOM series and PNG/JPEG files, with optional label maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._deps import require
from .geometry import CANONICAL_3D, to_canonical
from .scan import Scan
from .transforms import Augment, normalize_intensity, random_crop

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIX = ".dcm"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "dicom_series" if any(p.suffix.lower() == DICOM_SUFFIX for p in path.iterdir()) else None
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PHOTO_SUFFIXES):
        return "photo"
    if name.endswith(DICOM_SUFFIX):
        return "dicom"
    return None


def read_scan(path: str | os.PathLike, *, modality: str | None = None) -> Scan:
    """Read one image: a NIfTI file, a DICOM file, a folder holding one DICOM series, or a PNG/JPEG.

    3-D volumes come back in the canonical [S, P, L] layout (NIfTI from its affine; DICOM
    series sorted along the slice normal); 2-D images as [H, W]. ``modality`` overrides the
    DICOM tag or the guess (NIfTI: "CT" if it holds values below -500, else "MR"; photos: "CR").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"read_scan: {path} does not exist")
    kind = _kind(path)
    readers = {"nifti": _read_nifti, "dicom": _read_dicom_file, "dicom_series": _read_dicom_series,
               "photo": _read_photo}
    if kind is None:
        raise ValueError(f"read_scan: {path} is not a NIfTI (.nii, .nii.gz), DICOM (.dcm or a folder of .dcm) "
                         f"or PNG/JPEG image")
    try:
        scan = readers[kind](path)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as err:  # the libraries raise many types; name the file and the format tried
        raise ValueError(f"read_scan: could not read {path} as {kind.replace('_', ' ')}: {err}") from err
    if modality is not None:
        scan = Scan(scan.name, modality, scan.image, scan.spacing, scan.orientation)
    return scan


def _read_nifti(path: Path) -> Scan:
    nib = require("nibabel", purpose="reading NIfTI files")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim == 3 and 1 not in data.shape:
        image, spacing = to_canonical(data, img.affine)
        orientation = CANONICAL_3D
    elif data.ndim in (2, 3):
        image = np.squeeze(data)
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D or 3-D image, got shape {data.shape}")
        spacing, orientation = tuple(float(z) for z in img.header.get_zooms()[:2]), ()
    else:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {data.shape}")
    modality = "CT" if image.min() < -500 else "MR"
    return Scan(str(path), modality, np.ascontiguousarray(image, dtype=np.float32), spacing, orientation)


def _dicom_pixels(ds) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def _dicom_spacing(ds) -> tuple[float, float]:
    spacing = [float(v) for v in (ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1, 1])]
    return tuple(s if s > 0 else 1.0 for s in spacing)


def _read_dicom_file(path: Path) -> Scan:
    pydicom = require("pydicom", purpose="reading DICOM files")
    ds = pydicom.dcmread(path)
    pixels = _dicom_pixels(ds)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) and ds.get("SamplesPerPixel", 1) > 1:
        pixels = pixels[..., :3].mean(-1)
    spacing = _dicom_spacing(ds)
    if pixels.ndim == 3:  # multi-frame
        spacing = (float(ds.get("SliceThickness", 1) or 1), *spacing)
    return Scan(str(path), str(ds.get("Modality", "OT")), pixels, spacing)


def _read_dicom_series(folder: Path) -> Scan:
    pydicom = require("pydicom", purpose="reading DICOM series")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == DICOM_SUFFIX)
    slices = [pydicom.dcmread(p) for p in files]
    uids = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:
        raise ValueError(f"the folder holds {len(uids)} series (SeriesInstanceUID); put each in its own folder")
    if len(slices) == 1:
        return _read_dicom_file(files[0])
    orient = np.asarray(slices[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    if all("ImagePositionPatient" in s for s in slices):
        position = [float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=float))) for s in slices]
    else:
        position = [float(s.get("InstanceNumber", i)) for i, s in enumerate(slices)]
    order = np.argsort(position, kind="stable")
    volume = np.stack([_dicom_pixels(slices[i]) for i in order])
    gaps = np.diff(np.sort(position))
    thickness = float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else \
        float(slices[0].get("SliceThickness", 1) or 1)
    row, col = _dicom_spacing(slices[0])
    # Build the voxel -> LPS affine of the stacked [slice, row, column] array, then reuse the NIfTI path (RAS).
    origin = np.asarray(slices[order[0]].get("ImagePositionPatient", [0, 0, 0]), dtype=float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = normal * thickness, orient[3:] * row, orient[:3] * col, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image, spacing = to_canonical(volume, ras)
    return Scan(str(folder), str(slices[0].get("Modality", "OT")), image.astype(np.float32), spacing, CANONICAL_3D)


def _read_photo(path: Path) -> Scan:
    pil = require("PIL.Image", package="pillow", purpose="reading PNG/JPEG images")
    with pil.open(path) as img:
        array = np.asarray(img.convert("I;16") if img.mode.startswith("I;16") else img.convert("L"), dtype=np.float32)
    return Scan(str(path), "CR", array, (1.0, 1.0))


def read_label_names(source: str | os.PathLike | dict[int, str] | None, label_map: np.ndarray) -> dict[int, str]:
    """Label names from a dict, a text file of "id name" lines, or "label_<id>" when none are given."""
    present = sorted(set(np.unique(label_map).astype(int).tolist()) - {0})
    if source is None:
        names = {}
    elif isinstance(source, dict):
        names = {int(k): str(v) for k, v in source.items()}
    else:
        names = {}
        for line in Path(source).read_text().splitlines():
            parts = line.replace(",", " ").split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = "_".join(parts[1:])
    return {i: names.get(i, f"label_{i}") for i in present}


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *PHOTO_SUFFIXES, DICOM_SUFFIX):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_path(label_dir: Path, entry: Path) -> Path:
    """The entry of the same name under label_dir, else one with the same stem (``ct_series.nii.gz``)."""
    exact = label_dir / entry.name
    if exact.exists() or not label_dir.is_dir():
        return exact
    same_stem = sorted(p for p in label_dir.iterdir() if _kind(p) is not None and _stem(p) == _stem(entry))
    return same_stem[0] if same_stem else exact


class FolderDataset(torch.utils.data.Dataset):
    """Training samples from a folder of images (and an optional parallel folder of label maps).

    Every file or DICOM-series folder directly under ``root`` is one image; its label map is the
    entry with the same name under ``label_dir``, or else one with the same stem (a DICOM series
    folder ``ct1`` may have its labels in ``ct1.nii.gz``, stored in the same [S, P, L] layout after
    reorientation). Items are 2-D slices (``mode="2d"``: each axial
    slice of each volume, and each 2-D image) or 3-D crops (``mode="3d"``), normalised per
    modality (CT window, else percentiles), then randomly cropped and augmented;
    ``samples_per_image`` draws that many distinct samples from each slice/volume, each one
    reproducible from (seed, index).

    Items are dicts: ``image`` float32 [1, *crop] in [0, 1], ``labels`` int64 [*crop] (when a label
    map exists), ``id`` (path + slice), ``label_names``.
    """

    def __init__(self, root: str | os.PathLike, *, label_dir: str | os.PathLike | None = None,
                 label_names: str | os.PathLike | dict[int, str] | None = None, mode: str = "2d",
                 crop_size: tuple[int, ...] | None = None, modality: str | None = None,
                 window: str | tuple[float, float] = "soft_tissue", augment: Augment | None = None,
                 samples_per_image: int = 1, seed: int = 0) -> None:
        if mode not in ("2d", "3d"):
            raise ValueError(f"FolderDataset: mode must be '2d' or '3d', got {mode!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"FolderDataset: root {root} is not a folder")
        entries = sorted(p for p in root.iterdir() if _kind(p) is not None)
        if not entries:
            raise ValueError(f"FolderDataset: no images under {root} (looked for .nii, .nii.gz, .dcm files, "
                             "folders of .dcm files, .png, .jpg, .jpeg)")
        self.scans: list[Scan] = []
        for entry in entries:
            scan = read_scan(entry, modality=modality)
            if label_dir is not None:
                scan = self._attach_labels(scan, _label_path(Path(label_dir), entry), label_names)
            if mode == "3d" and scan.image.ndim != 3:
                raise ValueError(f"FolderDataset: mode='3d' needs volumes, but {entry} is 2-D")
            self.scans.append(scan)
        self.mode = mode
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.window = window
        self.augment = augment
        self.samples_per_image = samples_per_image
        self.seed = seed
        self._normalised = [normalize_intensity(s.image, s.modality, window=window) for s in self.scans]
        self.index = [(i, k) for i, s in enumerate(self.scans)
                      for k in (range(s.image.shape[0]) if mode == "2d" and s.image.ndim == 3 else [None])]

    @staticmethod
    def _attach_labels(scan: Scan, path: Path, names) -> Scan:
        if not path.exists():
            raise FileNotFoundError(f"FolderDataset: no label map for {scan.name}: expected {path}")
        labels = read_scan(path)
        if labels.image.shape != scan.image.shape:
            raise ValueError(f"FolderDataset: label map {path} has shape {labels.image.shape}, "
                             f"but its image {scan.name} has {scan.image.shape}")
        label_map = np.rint(labels.image).astype(np.int64)
        return Scan(scan.name, scan.modality, scan.image, scan.spacing, scan.orientation, label_map,
                    read_label_names(names, label_map))

    def __len__(self) -> int:
        return len(self.index) * self.samples_per_image

    def __getitem__(self, item: int) -> dict:
        if not 0 <= item < len(self):
            raise IndexError(f"FolderDataset: index {item} out of range for {len(self)} items")
        scan_idx, slice_idx = self.index[item // self.samples_per_image]
        scan = self.scans[scan_idx]
        image = torch.from_numpy(self._normalised[scan_idx])
        labels = torch.from_numpy(scan.label_map) if scan.label_map is not None else None
        if slice_idx is not None:
            image, labels = image[slice_idx], (labels[slice_idx] if labels is not None else None)
        image = image[None].clone()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        if self.crop_size is not None:
            if len(self.crop_size) != image.dim() - 1:
                raise ValueError(f"FolderDataset: crop_size {self.crop_size} must have {image.dim() - 1} entries")
            image, labels = random_crop(image, labels, self.crop_size, gen)
        if self.augment is not None:
            image, labels = self.augment(image, labels, gen)
        sample = {"image": image.float(), "id": scan.name + (f"#{slice_idx}" if slice_idx is not None else ""),
                  "label_names": scan.label_names}
        if labels is not None:
            sample["labels"] = labels.long()
        return sample
