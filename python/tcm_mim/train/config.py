"""Pretraining configuration: documented defaults, a YAML file, then ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field

METHODS = ("spark", "tcm", "anatomask", "amlp")
LOCALIZERS = ("label", "atlas", "clipseg")


def is_3d_encoder(name: str) -> bool:
    """Encoders named for volumes (``resnet3d``, ``resnet3d_tiny``): their configs are sized for 3-D.

    Every other encoder is 2-D by default but may be built 3-D with an explicit ``dim: 3``.
    """
    return "3d" in name.lower()


@dataclass
class PretrainConfig:
    # what to train
    method: str = "tcm"  # spark | tcm | anatomask | amlp
    dataset: str = "chest_ct"  # an embedded dataset name, or a folder of NIfTI / DICOM / PNG (FolderDataset)
    label_dir: str | None = None  # folder datasets: label maps with the images' names (tcm needs them)
    label_names: str | None = None  # folder datasets: text file of "id name" lines naming the labels
    prompts: list[str] = field(default_factory=lambda: ["left lung", "heart"])  # tcm: the diagnostic text
    localizer: str = "label"  # tcm: label (the scans' label maps) | atlas (registered atlas: unlabelled) | clipseg
    atlas: str | None = None  # localizer=atlas: brain_mri | chest_ct; None: the dataset's name if it is one of them
    clipseg_checkpoint: str | None = None  # localizer=clipseg: a local CLIPSeg checkpoint folder
    encoder: str = "resnet_tiny"  # see tcm_mim.models.build_encoder
    dim: int | None = None  # 2 (slices) or 3 (volumes); None: 3 for a 3-D encoder (name with "3d"), else 2
    decoder_width: int = 64
    image_size: int = 128  # side of the square (2-D) or cubic (3-D) crops, a multiple of the encoder's patch size
    # masking
    mask_ratio: float | None = None  # None: the method's default (spark/anatomask 0.6, tcm 0.4, amlp ramps)
    roi_mask_ratio: float = 0.7  # tcm: share of ROI patches masked (background takes the rest of the budget)
    roi_threshold: float = 0.5
    hard_fraction_max: float = 0.5  # anatomask: curriculum ends at this share of the budget from hard patches
    amlp_ratio_start: float = 0.4
    amlp_ratio_end: float = 0.7
    amlp_ccl_weight: float = 0.1  # amlp: weight of the category consistency loss (0 turns it off)
    amlp_ccl_blend: float = 0.5  # amlp: CCL target = (1 - blend) * k-means lesion cluster + blend * hard patch
    # losses
    contrastive_weight: float = 0.1  # tcm: InfoNCE between two masked views
    temperature: float = 0.2
    ema: float = 0.99  # anatomask teacher
    # optimisation
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    backend: str | None = None  # "reference" runs the same model on the dense-emulation ops
    # output
    out_dir: str = "runs/pretrain"
    log_every: int = 10
    image_every: int = 100
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"config: method must be one of {METHODS}, got {self.method!r}")
        if self.backend not in (None, "reference", "cpu", "triton", "cuda"):
            raise ValueError(f"config: backend must be reference/cpu/triton/cuda or null, got {self.backend!r}")
        if self.dim not in (None, 2, 3):
            raise ValueError(f"config: dim must be 2, 3 or null (inferred from the encoder), got {self.dim!r}")
        if self.dim == 2 and is_3d_encoder(self.encoder):
            raise ValueError(f"config: encoder {self.encoder!r} is a 3-D encoder, but dim is 2; leave dim unset "
                             f"(or 3) for it, or pick a 2-D encoder such as resnet_tiny")
        if not 0.0 <= self.amlp_ccl_blend <= 1.0:
            raise ValueError(f"config: amlp_ccl_blend must be in [0, 1], got {self.amlp_ccl_blend}")
        if self.localizer not in LOCALIZERS:
            raise ValueError(f"config: localizer must be one of {LOCALIZERS}, got {self.localizer!r}")
        if self.atlas is not None and self.atlas not in ("brain_mri", "chest_ct"):
            raise ValueError(f"config: atlas must be brain_mri, chest_ct or null, got {self.atlas!r}")
        if self.localizer == "atlas" and self.atlas is None and self.dataset not in ("brain_mri", "chest_ct"):
            raise ValueError(f"config: localizer=atlas needs atlas=brain_mri or atlas=chest_ct for dataset "
                             f"{self.dataset!r}")
        if self.localizer == "clipseg" and not self.clipseg_checkpoint:
            raise ValueError("config: localizer=clipseg needs clipseg_checkpoint=DIR (a local CLIPSeg checkpoint)")
        if self.amlp_ccl_weight < 0:
            raise ValueError(f"config: amlp_ccl_weight must be >= 0, got {self.amlp_ccl_weight}")

    @property
    def spatial_dims(self) -> int:
        """2 or 3: ``dim`` if set, else 3 for a 3-D encoder and 2 for every other one."""
        if self.dim is not None:
            return self.dim
        return 3 if is_3d_encoder(self.encoder) else 2

    def ratio_at(self, step: int) -> float:
        """The overall masking ratio at ``step``."""
        if self.method == "amlp":
            t = min(step / max(self.steps - 1, 1), 1.0)
            return self.amlp_ratio_start + t * (self.amlp_ratio_end - self.amlp_ratio_start)
        if self.mask_ratio is not None:
            return self.mask_ratio
        return 0.4 if self.method == "tcm" else 0.6

    def hard_fraction_at(self, step: int) -> float:
        """AnatoMask's curriculum: the hard share of the budget grows linearly to ``hard_fraction_max``."""
        return min((step + 1) / max(self.steps, 1), 1.0) * self.hard_fraction_max


def _coerce(value: str, current, name: str):
    import yaml

    parsed = yaml.safe_load(value)
    if current is None or parsed is None:
        return parsed
    if isinstance(current, bool):
        if not isinstance(parsed, bool):
            raise ValueError(f"config: {name} must be true/false, got {value!r}")
        return parsed
    if isinstance(current, (int, float)) and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return type(current)(parsed)
    if isinstance(current, list):
        return parsed if isinstance(parsed, list) else [s.strip() for s in str(value).split(",")]
    if isinstance(current, str):
        return str(value)
    raise ValueError(f"config: cannot set {name} (a {type(current).__name__}) from {value!r}")


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (YAML syntax for values)."""
    import yaml

    values: dict = {}
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    if path is not None:
        loaded = yaml.safe_load(pathlib.Path(path).read_text()) or {}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown} in {path}; known: {sorted(names)}")
        values.update(loaded)
    base = PretrainConfig(**values)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"config: overrides are key=value with key in {sorted(names)}, got {item!r}")
        values[key] = _coerce(raw, getattr(base, key), key)
    return PretrainConfig(**values)
