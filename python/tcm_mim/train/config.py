"""Pretraining configuration: documented defaults, a YAML file, then ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field

METHODS = ("spark", "tcm", "anatomask", "amlp")


@dataclass
class PretrainConfig:
    # what to train
    method: str = "tcm"  # spark | tcm | anatomask | amlp
    dataset: str = "chest_ct"  # an embedded dataset name, or a folder path
    prompts: list[str] = field(default_factory=lambda: ["left lung", "heart"])  # tcm: the diagnostic text
    encoder: str = "resnet_tiny"  # see tcm_mim.models.build_encoder
    decoder_width: int = 64
    image_size: int = 128  # square 2-D crops (a multiple of the encoder's patch size, 32 for ResNets)
    # masking
    mask_ratio: float | None = None  # None: the method's default (spark/anatomask 0.6, tcm 0.4, amlp ramps)
    roi_mask_ratio: float = 0.7  # tcm: share of ROI patches masked (background takes the rest of the budget)
    roi_threshold: float = 0.5
    hard_fraction_max: float = 0.5  # anatomask: curriculum ends at this share of the budget from hard patches
    amlp_ratio_start: float = 0.4
    amlp_ratio_end: float = 0.7
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
