"""Wall and CPU time of one default 3-D atlas registration per atlas (issue 20 speed target: <= 60 s on 2 cores).

Run on a quiet machine: ``OMP_NUM_THREADS=2 python benchmarks/time_atlas_registration.py``. The scan is the atlas
deformed by a known random map (the validation's ``deform_scan``), so the registration does real work.
"""

from __future__ import annotations

import os
import time

from tcm_mim.data import load_embedded
from tcm_mim.localize.atlas import AtlasLocalizer
from tcm_mim.localize.validate_atlas import deform_scan


def main() -> None:
    for name in ("brain_mri", "chest_ct"):
        scan = deform_scan(load_embedded(name)[0], seed=3)
        localizer = AtlasLocalizer(name)
        wall, cpu = time.perf_counter(), time.process_time()
        localizer.register(scan.image, spacing=scan.spacing)
        print(f"{name}: wall {time.perf_counter() - wall:.1f} s, cpu {time.process_time() - cpu:.1f} s, "
              f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
