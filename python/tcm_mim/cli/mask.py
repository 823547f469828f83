"""tcm-mask: show what a prompt will make the masking pick, as a PNG overlay.

    tcm-mask --dataset brain_mri --prompt "left hippocampus" --mask-ratio 0.4 --strategy stratified --out mask.png
    tcm-mask --image scan.nii.gz --labels seg.nii.gz --label-names names.txt --prompt "liver" --out liver.png
    tcm-mask --image unlabelled_t1.nii.gz --localizer atlas --atlas brain_mri --prompt "left hippocampus" \
             --out hippo.png --qc-out hippo_qc.png
    tcm-mask --image cxr.png --localizer clipseg --checkpoint ./clipseg-dir --prompt "left lung" --out cxr_mask.png
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from ..data import EMBEDDED, load_embedded, normalize_intensity, read_label_names, read_scan
from ..data.scan import Scan
from ..errors import UserError
from ..localize import ATLASES, AtlasLocalizer, CLIPSegLocalizer, LabelTextLocalizer
from ..masking import mask_from_saliency
from ..viz import render_atlas_qc, render_overlay, save_png
from .common import ArgumentParser, run

DISPLAY_CT_WINDOW = (-300.0, 1600.0)  # lungs, mediastinum and bone all visible


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tcm-mask", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=EMBEDDED, help="an embedded dataset (ships offline)")
    src.add_argument("--image", help="a NIfTI file, DICOM file or series folder, or PNG/JPEG")
    p.add_argument("--index", type=int, default=0, help="which scan of the embedded dataset (default 0, labelled)")
    p.add_argument("--labels", help="label map for --image (same grid), needed by the label-text localizer")
    p.add_argument("--label-names", help='text file of "id name" lines for --labels')
    p.add_argument("--modality", help="override the modality of --image (CT, MR, CR, ...)")
    p.add_argument("--prompt", required=True, help='e.g. "left hippocampus", "left lung and heart"')
    p.add_argument("--localizer", choices=("label", "atlas", "clipseg"), default="label",
                   help="label: the scan's label map; atlas: register an atlas (unlabelled 3-D scans); clipseg")
    p.add_argument("--atlas", choices=ATLASES, help="for --localizer atlas (default: --dataset if it is one)")
    p.add_argument("--qc-out", help="for --localizer atlas: PNG of the atlas contours on the scan")
    p.add_argument("--checkpoint", help="local CLIPSeg checkpoint folder (for --localizer clipseg)")
    p.add_argument("--margin-mm", type=float, default=0.0, help="grow the matched region by this many mm")
    p.add_argument("--mask-ratio", type=float, default=0.4, help="share of patches masked, in [0, 1)")
    p.add_argument("--strategy", choices=("uniform", "weighted", "stratified", "hardest"), default="stratified")
    p.add_argument("--roi-mask-ratio", type=float, default=0.75, help="stratified: share of ROI patches masked")
    p.add_argument("--roi-threshold", type=float, default=0.5)
    p.add_argument("--reduce", choices=("max", "mean"), default="max", help="saliency -> patch score pooling")
    p.add_argument("--patch-size", type=int, default=None, help="default 16 (2-D) or 8 (3-D)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output PNG")
    return p


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model and no data, so that a wrong argument fails at once (:class:`UserError`)."""
    def number(flag: str, value: float, ok: bool, allowed: str) -> None:
        if not (math.isfinite(value) and ok):
            raise UserError(f"{flag} must be {allowed}, got {value}")

    number("--mask-ratio", args.mask_ratio, 0 <= args.mask_ratio < 1, "in [0, 1)")
    number("--roi-mask-ratio", args.roi_mask_ratio, 0 <= args.roi_mask_ratio <= 1, "in [0, 1]")
    number("--roi-threshold", args.roi_threshold, 0 <= args.roi_threshold <= 1, "in [0, 1]")
    number("--margin-mm", args.margin_mm, args.margin_mm >= 0, ">= 0")
    if args.patch_size is not None and args.patch_size < 1:
        raise UserError(f"--patch-size must be >= 1, got {args.patch_size}")
    if args.index < 0:
        raise UserError(f"--index must be >= 0, got {args.index}")
    if not args.prompt.strip():
        raise UserError("--prompt must be non-empty text")
    if args.dataset is not None and (args.labels or args.label_names):
        raise UserError("--labels and --label-names go with --image (an embedded --dataset has its own labels)")
    for flag, value in (("--image", args.image), ("--labels", args.labels), ("--label-names", args.label_names)):
        if value is not None and not pathlib.Path(value).exists():
            raise UserError(f"{flag} {value} does not exist")
    if args.localizer == "clipseg":
        if args.checkpoint is None:
            raise UserError("--localizer clipseg needs --checkpoint DIR (a local CLIPSeg checkpoint)")
        if not pathlib.Path(args.checkpoint).is_dir():
            raise UserError(f"--checkpoint {args.checkpoint} is not a folder (a local CLIPSeg checkpoint)")
    if args.localizer == "atlas" and args.atlas is None and args.dataset not in ATLASES:
        raise UserError(f"--localizer atlas needs --atlas ({' or '.join(ATLASES)})")
    if args.qc_out is not None and args.localizer != "atlas":
        raise UserError("--qc-out goes with --localizer atlas (it draws the registered atlas)")
    for flag, value in (("--out", args.out), ("--qc-out", args.qc_out)):
        if value is None:
            continue
        out = pathlib.Path(value)
        if out.suffix.lower() != ".png":
            raise UserError(f"{flag} must be a .png file, got {value}")
        if not out.parent.is_dir():
            raise UserError(f"{flag} {value}: the folder {out.parent} does not exist")


def _read(path: str, flag: str, **kw) -> Scan:
    try:
        return read_scan(path, **kw)
    except (ValueError, OSError) as err:  # not an image file, an unknown format, unreadable
        raise UserError(f"{flag} {path}: {err}") from err


def _load(args) -> Scan:
    if args.dataset is not None:
        scans = load_embedded(args.dataset)
        if not args.index < len(scans):
            raise UserError(f"--index must be in [0, {len(scans) - 1}] for {args.dataset}, got {args.index}")
        return scans[args.index]
    scan = _read(args.image, "--image", modality=args.modality)
    if args.labels is None:
        return scan
    labels = _read(args.labels, "--labels")
    if labels.image.shape != scan.image.shape:
        raise UserError(f"--labels shape {labels.image.shape} differs from --image {scan.image.shape}")
    label_map = np.rint(labels.image).astype(np.int64)
    return Scan(scan.name, scan.modality, scan.image, scan.spacing, scan.orientation, label_map,
                read_label_names(args.label_names, label_map))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    scan = _load(args)
    if args.localizer == "clipseg":
        localizer = CLIPSegLocalizer(args.checkpoint)
        matched = "CLIPSeg"
    elif args.localizer == "atlas":
        scan, localizer, matched = _register_atlas(args, scan)
    else:
        if scan.labels is None:
            raise UserError("the label-text localizer needs a label map: pass --labels (and --label-names), or use "
                            "--localizer clipseg --checkpoint DIR")
        localizer = LabelTextLocalizer(margin_mm=args.margin_mm)
        try:
            matches = localizer.match(args.prompt, scan.labels)
        except ValueError as err:  # no label matches the prompt: the message lists the closest names
            raise UserError(str(err)) from err
        matched = ", ".join(m.name for m in matches[:6]) + (f" +{len(matches) - 6}" if len(matches) > 6 else "")
    saliency = localizer(scan.image, args.prompt, labels=scan.labels)
    patch = args.patch_size or (16 if scan.image.ndim == 2 else 8)
    mask = mask_from_saliency(saliency, patch, args.mask_ratio, strategy=args.strategy, seed=args.seed,
                              roi_threshold=args.roi_threshold, roi_mask_ratio=args.roi_mask_ratio,
                              reduce=args.reduce)
    masked = ~mask.sample.visible[0]
    n_roi = int(mask.roi.sum())
    roi_masked = int((masked & mask.roi).sum())
    window = DISPLAY_CT_WINDOW if scan.modality == "CT" else "soft_tissue"
    display = normalize_intensity(scan.image, scan.modality, window=window)
    title = (f"{scan.name} | '{args.prompt}' -> {matched} | {args.strategy} ratio {args.mask_ratio}, patch {patch}: "
             f"masked {int(masked.sum())}/{masked.numel()}, ROI {roi_masked}/{n_roi}")
    save_png(render_overlay(display, saliency, mask.visible, scan.spacing, title), args.out)
    print(title)
    print(f"wrote {args.out}")
    return 0


def _register_atlas(args, scan: Scan) -> tuple[Scan, LabelTextLocalizer, str]:
    """The scan with the registered atlas's labels, the localizer for them, and the matched names (QC PNG)."""
    atlas = args.atlas or args.dataset
    localizer = AtlasLocalizer(atlas)
    try:
        matches = localizer.match(args.prompt)
        registration = localizer.register(scan)
    except ValueError as err:  # no label matches the prompt, or AtlasRegistrationError: the message says which
        raise UserError(str(err)) from err
    labels = registration.labels
    if args.qc_out:
        title = (f"{scan.name}: atlas {atlas} registered in {registration.seconds:.1f} s, foreground Dice "
                 f"{registration.foreground_dice:.3f}; red: '{args.prompt}'")
        display = normalize_intensity(scan.image, scan.modality,
                                      window=DISPLAY_CT_WINDOW if scan.modality == "CT" else "soft_tissue")
        save_png(render_atlas_qc(display, labels.array, scan.spacing, title,
                                 highlight=labels.mask(m.label_id for m in matches)), args.qc_out)
        print(f"wrote {args.qc_out}")
    matched = f"atlas {atlas}: " + ", ".join(m.name for m in matches[:6]) + \
        (f" +{len(matches) - 6}" if len(matches) > 6 else "")
    # From here on the warped labels are the scan's labels, matched by the label-text localizer.
    scan = Scan(scan.name, scan.modality, scan.image, scan.spacing, scan.orientation, labels.array, labels.names)
    return scan, localizer.label_localizer, matched


def main(argv: Sequence[str] | None = None) -> int:
    """``tcm-mask``: 0 on success, 2 on a user error (one line on stderr)."""
    return run("tcm-mask", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
