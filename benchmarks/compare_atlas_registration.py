"""SimpleITK (what AtlasLocalizer uses) against ANTsPy on the known-deformation test, one scan per atlas.

    pip install antspyx   # not a dependency of the project: only this comparison needs it
    python benchmarks/compare_atlas_registration.py --atlas brain_mri chest_ct --seed 1

Both register the embedded atlas to ``deform_scan(atlas, seed)`` and warp the labels with nearest
neighbour; printed: wall and CPU time (all threads) and the mean Dice over the structures larger than 5 cm³.
ANTsPy runs its ``antsRegistrationSyNQuick[s]`` preset (rigid, affine, then symmetric diffeomorphic SyN with the
reduced iterations of ANTs's quick script), SimpleITK ``AtlasLocalizer``'s defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from tcm_mim.data import load_embedded
from tcm_mim.localize import AtlasLocalizer
from tcm_mim.localize.validate_atlas import LARGE_CM3, deform_scan, dice_per_label


def _ants(atlas, target) -> np.ndarray:
    import ants

    fixed = ants.from_numpy(target.image.astype(np.float32), spacing=tuple(target.spacing))
    moving = ants.from_numpy(atlas.image.astype(np.float32), spacing=tuple(atlas.spacing))
    labels = ants.from_numpy(atlas.label_map.astype(np.float32), spacing=tuple(atlas.spacing))
    reg = ants.registration(fixed, moving, type_of_transform="antsRegistrationSyNQuick[s]", random_seed=1)
    warped = ants.apply_transforms(fixed, labels, reg["fwdtransforms"], interpolator="genericLabel")
    return np.rint(warped.numpy()).astype(np.int16)


def _sitk(atlas_name, target) -> np.ndarray:
    return AtlasLocalizer(atlas_name).register(dataclasses.replace(target, label_map=None, label_names={})).labels.array


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlas", nargs="+", default=["brain_mri", "chest_ct"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tools", nargs="+", default=["simpleitk", "ants"])
    args = parser.parse_args(argv)
    print(f"load {os.getloadavg()}")
    for name in args.atlas:
        atlas = load_embedded(name)[0]
        target = deform_scan(atlas, args.seed)
        cm3 = float(np.prod(atlas.spacing)) / 1000
        large = [i for i in atlas.label_names if (atlas.label_map == i).sum() * cm3 > LARGE_CM3]
        for tool in args.tools:
            start, cpu = time.perf_counter(), time.process_time()
            labels = _ants(atlas, target) if tool == "ants" else _sitk(name, target)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            dice = dice_per_label(labels, target.label_map, large)
            print(f"{name} {tool}: {seconds:.1f} s wall, {cpu:.1f} s CPU (load {os.getloadavg()[0]:.1f}), "
                  f"mean Dice (> {LARGE_CM3:g} cm³, {len(large)} structures) "
                  f"{np.mean(list(dice.values())):.3f}, min {min(dice.values()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
