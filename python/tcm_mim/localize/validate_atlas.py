"""Validation of :class:`AtlasLocalizer`: known deformations of the atlases, Dice per structure, prompt mass.

    python -m tcm_mim.localize.validate_atlas --atlas brain_mri chest_ct --out atlas_validation.md

Each atlas is deformed by a known random affine plus a smooth random displacement field (scipy, not the
registration library's transform model), the atlas is registered back to the deformed image, and the
warped labels are compared with the truth (the atlas labels deformed by the same map).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .._deps import require
from ..data.scan import Scan
from .atlas import AtlasLocalizer, dice

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
    return {int(i): dice(pred == i, truth == i) for i in ids}


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # [S, P, L] -> [L, P, S]; +L and +P are -x and -y in RAS.
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), affine), str(path))


# (prompt as a clinician would write it, the structures it means, the mirror structures), written out by
# hand from the atlases' label lists. "*" expands to every label of that prefix (AAL3 splits the thalamus).
PROMPTS = {
    "brain_mri": [
        ("left hippocampus", ["Hippocampus_L"], ["Hippocampus_R"]),
        ("right hippocampus", ["Hippocampus_R"], ["Hippocampus_L"]),
        ("left putamen", ["Putamen_L"], ["Putamen_R"]),
        ("right caudate nucleus", ["Caudate_R"], ["Caudate_L"]),
        ("insula, left", ["Insula_L"], ["Insula_R"]),
        ("right amygdala", ["Amygdala_R"], ["Amygdala_L"]),
        ("left thalamus", ["Thal_*_L"], ["Thal_*_R"]),
        ("right precuneus", ["Precuneus_R"], ["Precuneus_L"]),
    ],
    "chest_ct": [
        ("left lung", ["lung_upper_lobe_left", "lung_lower_lobe_left"],
         ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"]),
        ("right lung", ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
         ["lung_upper_lobe_left", "lung_lower_lobe_left"]),
        ("right kidney", ["kidney_right"], ["kidney_left"]),
        ("left kidney", ["kidney_left"], ["kidney_right"]),
        ("left upper lobe of the lung", ["lung_upper_lobe_left"], ["lung_upper_lobe_right"]),
        ("right lower lobe", ["lung_lower_lobe_right"], ["lung_lower_lobe_left"]),
        ("left scapula", ["scapula_left"], ["scapula_right"]),
        ("right humerus", ["humerus_right"], ["humerus_left"]),
    ],
}


def _ids(names: dict[int, str], patterns: list[str]) -> set[int]:
    out = set()
    for p in patterns:
        if "*" in p:
            head, tail = p.split("*")
            out |= {i for i, n in names.items() if n.startswith(head) and n.endswith(tail)}
        else:
            out |= {i for i, n in names.items() if n == p}
    if not out:
        raise ValueError(f"validate_atlas: no label named {patterns}")
    return out


def _mirror(name: str) -> str | None:
    for a, b in (("_L", "_R"), ("_R", "_L"), ("_left", "_right"), ("_right", "_left")):
        if name.endswith(a):
            return name[: -len(a)] + b
        if a.strip("_") in name.split("_") and a in ("_left", "_right"):
            return name.replace(a.strip("_"), b.strip("_"))
    return None


def validate(name: str, seeds: list[int], **settings) -> dict:
    """Register the atlas ``name`` to its deformations ``seeds``; Dice per structure, swaps, prompt mass, time."""
    from ..data import load_embedded

    atlas = load_embedded(name)[0]
    localizer = AtlasLocalizer(name, **settings)
    cm3 = float(np.prod(atlas.spacing)) / 1000
    names = atlas.label_names
    by_name = {v: k for k, v in names.items()}
    rows = {"dice": {i: [] for i in names}, "before": {i: [] for i in names}, "seconds": [], "swaps": [],
            "prompts": {p: [] for p, _, _ in PROMPTS[name]}, "fg_dice": [], "cpu": []}
    for seed in seeds:
        truth = deform_scan(atlas, seed)
        unlabelled = dataclasses.replace(truth, label_map=None, label_names={})
        reg = localizer.register(unlabelled)
        rows["seconds"].append(reg.seconds)
        rows["cpu"].append(reg.cpu_seconds)
        rows["fg_dice"].append(reg.foreground_dice)
        for i, d in dice_per_label(reg.labels.array, truth.label_map, names).items():
            rows["dice"][i].append(d)
        for i, d in dice_per_label(atlas.label_map, truth.label_map, names).items():
            rows["before"][i].append(d)
        for i, n in names.items():  # a swap: the structure lands more on its mirror than on itself
            m = by_name.get(_mirror(n) or "")
            if m is not None:
                pred = reg.labels.array == i
                if (pred & (truth.label_map == m)).sum() > (pred & (truth.label_map == i)).sum():
                    rows["swaps"].append((seed, n))
        for prompt, target, opposite in PROMPTS[name]:
            saliency = localizer(unlabelled, prompt).numpy()
            rows["prompts"][prompt].append(prompt_mass(saliency, truth.label_map, _ids(names, target),
                                                       _ids(names, opposite)))
    rows["size_cm3"] = {i: float((atlas.label_map == i).sum()) * cm3 for i in names}
    rows["names"] = names
    return rows


def _mean(values: dict[int, float], ids: list[int]) -> float:
    return float(np.mean([values[i] for i in ids])) if ids else float("nan")


def _table(name: str, rows: dict) -> str:
    names, size = rows["names"], rows["size_cm3"]
    large = [i for i in names if size[i] > LARGE_CM3]
    small = [i for i in names if size[i] <= LARGE_CM3]
    mean = {i: float(np.mean(rows["dice"][i])) for i in names}
    before = {i: float(np.mean(rows["before"][i])) for i in names}
    q = np.percentile([mean[i] for i in small], [0, 25, 50, 75, 100]) if small else [float("nan")] * 5
    worst = sorted(large, key=mean.get)[:3]
    lines = [f"**{name}** ({len(rows['seconds'])} deformations; registration {np.min(rows['seconds']):.1f}-"
             f"{np.max(rows['seconds']):.1f} s wall, {np.min(rows['cpu']):.1f}-{np.max(rows['cpu']):.1f} s CPU; "
             f"foreground Dice {np.min(rows['fg_dice']):.3f}-{np.max(rows['fg_dice']):.3f})", "",
             "| structures | count | mean Dice after (before) | min | small: min / q1 / median / q3 / max |",
             "|---|---:|---:|---:|---|",
             f"| > {LARGE_CM3:g} cm³ | {len(large)} | **{np.mean([mean[i] for i in large]):.3f}** "
             f"({np.mean([before[i] for i in large]):.3f}) | {min(mean[i] for i in large):.3f} "
             f"({', '.join(f'{names[i]} {mean[i]:.2f}' for i in worst)}) | |",
             f"| ≤ {LARGE_CM3:g} cm³ | {len(small)} | {_mean(mean, small):.3f} ({_mean(before, small):.3f}) | | "
             + " / ".join(f"{v:.2f}" for v in q) + " |",
             "", f"left/right swaps: {len(rows['swaps'])} {rows['swaps'] if rows['swaps'] else ''}", "",
             "| prompt | saliency mass inside (min over deformations) | on the opposite side (max) |",
             "|---|---:|---:|"]
    for prompt, values in rows["prompts"].items():
        inside, other = min(v[0] for v in values), max(v[1] for v in values)
        lines.append(f"| {prompt} | {inside:.3f}{'' if inside >= 0.6 else ' ✗'} | {other:.4f}"
                     f"{'' if other <= 0.05 else ' ✗'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcm_mim.localize.validate_atlas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas", nargs="+", default=["brain_mri", "chest_ct"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="also write the Markdown tables here")
    args = parser.parse_args(argv)
    head = (f"AtlasLocalizer validation, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{platform.processor() or platform.machine()}, {_cpu_model()}, load {_load()}, default settings")
    parts = [head]
    for name in args.atlas:
        parts.append(_table(name, validate(name, args.seeds)))
        print(parts[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(parts) + "\n")
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} threads"
    except OSError:
        pass
    return "unknown CPU"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
