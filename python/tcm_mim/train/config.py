"""Pretraining configuration: typed keys with documented defaults, a YAML file, then ``key=value`` overrides.

Every key is declared once, below in :class:`PretrainConfig`, with its type (the annotation), default,
allowed values and one-line meaning. Values from a YAML file and from ``key=value`` are converted to the
declared type (``lr=1e-3`` and ``lr: 1e-3`` are floats, though YAML 1.1 reads ``1e-3`` as a string) and
validated when the config is built; every error names the key, the value and what is allowed.
``tcm-pretrain --help`` lists the keys from the same declarations (:func:`describe_keys`), and
``--resume`` compares configs by each key's declared ``resume`` rule (:func:`resume_changes`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..models.encoders import ENCODERS, encoder_patch_size
from ..models.spark import DECODERS
from .methods import method_class, method_names

METHODS = method_names()  # every module of tcm_mim/train/methods/ registers one
LOCALIZERS = ("label", "atlas", "clipseg")
ATLASES = ("brain_mri", "chest_ct")
BACKENDS = ("reference", "cpu", "triton", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# How a key may differ between a checkpoint's config and the config of the run resuming it:
FREE = "free"  # changes how the run executes or reports, not what it computes (device, out_dir, *_every)
GROW = "grow"  # may grow freely; a smaller value changes the run (steps: the cosine schedule's end)
CHANGES = "changes"  # changes the run: refused on --resume unless changes are applied explicitly
FIXED = "fixed"  # the checkpoint's tensors would not fit (model shape, method heads): never changes


class ConfigError(UserError):
    """A config key with a wrong type or value, an unknown key, or an unreadable config file."""


@dataclass(frozen=True)
class Bounds:
    """An interval for a number; ``str()`` says it the way error messages and ``--help`` show it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}"


AT_LEAST_1 = Bounds(lo=1)
AT_LEAST_0 = Bounds(lo=0)
POSITIVE = Bounds(lo=0, lo_open=True)
UNIT = Bounds(0, 1)
OPEN_UNIT = Bounds(0, 1, lo_open=True, hi_open=True)


def _key(default=dataclasses.MISSING, help: str = "", *, factory: Callable | None = None,
         choices: tuple | None = None, bounds: Bounds | None = None, resume: str = CHANGES,
         allowed: str | None = None, check: Callable[[object], bool] | None = None):
    """A config field: ``help`` is its one-line meaning; ``choices``, ``bounds`` or ``check`` (with its
    description ``allowed``) its valid values; ``resume`` how it may differ from a resumed checkpoint's."""
    meta = {"help": help, "choices": choices, "bounds": bounds, "resume": resume, "allowed": allowed,
            "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class PretrainConfig:
    """Everything a pretraining run is made of. Build it with :func:`load_config` (YAML + ``key=value``)
    or directly; either way every key is converted to its type and validated (:class:`ConfigError`)."""

    # what to train
    method: str = _key("tcm", "masking method; the loss and extra heads follow it", choices=METHODS, resume=FIXED)
    dataset: str = _key("chest_ct", "an embedded dataset name (brain_mri, chest_ct, chest_xray), a corpus written "
                                    "by tcm-prepare, or a folder of NIfTI / DICOM / PNG files (prepared into "
                                    "<out_dir>/corpus first)")
    label_dir: str | None = _key(None, "folder datasets: label maps with the images' names (tcm needs them)")
    label_names: str | None = _key(None, 'folder datasets: text file of "id name" lines naming the labels')
    # the embedded chest task scores lung, heart, liver, aorta and vertebra: TCM's guidance avoids them
    prompts: list[str] = _key(help="tcm: the diagnostic text, one saliency per prompt (non-empty for tcm); on a "
                                   "block-split scan none may select a class the evaluation scores",
                              factory=lambda: ["trachea", "esophagus"])
    localizer: str = _key("label", "tcm: where the prompts' saliency comes from: label (the scans' label maps), atlas "
                                   "(a registered atlas: unlabelled 3-D scans) or clipseg (clipseg_checkpoint)",
                          choices=LOCALIZERS)
    atlas: str | None = _key(None, "localizer=atlas: brain_mri or chest_ct; null: the dataset's name if it is one",
                             allowed="brain_mri, chest_ct or null", check=lambda v: v in ATLASES)
    clipseg_checkpoint: str | None = _key(None, "localizer=clipseg: a local CLIPSeg checkpoint folder")
    encoder: str = _key("resnet_tiny", "sparse encoder (tcm_mim.models.build_encoder)", choices=ENCODERS,
                        resume=FIXED)
    dim: int | None = _key(None, "2 (slices) or 3 (volumes); null: 3 for an encoder named *3d*, else 2",
                           allowed="2, 3 or null (inferred from the encoder)", check=lambda v: v in (2, 3),
                           resume=FIXED)
    decoder_width: int = _key(64, "channels of the decoder at its deepest scale (SparK's decoder: 768)",
                              bounds=AT_LEAST_1, resume=FIXED)
    decoder: str = _key("light", "light: this package's small U-Net decoder; spark: SparK's (k4/s2 up, "
                                 "conv3-BN-ReLU6-conv3-BN; docs/methods.md)", choices=DECODERS, resume=FIXED)
    drop_path: float = _key(0.0, "stochastic depth of the encoder's last block, linear from 0 (SparK's ResNet-50: "
                                 "0.05)", bounds=Bounds(0, 1, hi_open=True))
    image_size: int = _key(128, "side of the square (2-D) or cubic (3-D) crops, a multiple of the encoder's "
                                "patch size", bounds=AT_LEAST_1)
    # what pretraining holds out for evaluation (tcm_mim.data.split)
    split: str | None = _key(None, "split manifest (JSON, tcm_mim.data.split) of the held-out test scans/blocks "
                                   "pretraining never reads; null: embedded data use their axial-block split, a "
                                   "folder or corpus holds out test_fraction of its scans (split_seed)", resume=FIXED)
    test_fraction: float = _key(0.2, "share of a folder's or corpus's scans held out for evaluation (split: null)",
                                bounds=OPEN_UNIT, resume=FIXED)
    split_seed: int = _key(0, "seed of the held-out scans (split: null); the same for every method and seed",
                           bounds=AT_LEAST_0, resume=FIXED)
    # masking
    mask_ratio: float | None = _key(None, "share of patches masked; null: the method's default (spark/anatomask "
                                          "0.6, tcm 0.4, amlp ramps)", bounds=OPEN_UNIT)
    roi_mask_ratio: float = _key(0.7, "tcm: share of ROI patches masked (background takes the rest of the budget)",
                                 bounds=UNIT)
    roi_threshold: float = _key(0.5, "tcm: patch score above which a patch counts as ROI", bounds=UNIT)
    tcm_masking: str = _key("overall", "tcm: overall = mask_ratio of all patches, roi_mask_ratio of them on ROI; "
                                       "region_ratios = fixed shares of each region (the authors' code)",
                            choices=("overall", "region_ratios"))
    region_roi_ratio: float = _key(0.8, "tcm region_ratios: share of ROI patches masked (ROI: any saliency >= "
                                        "roi_threshold in the patch)", bounds=UNIT)
    region_background_ratio: float = _key(0.4, "tcm region_ratios: share of background patches masked",
                                          bounds=UNIT)
    hard_fraction_max: float = _key(0.5, "anatomask: curriculum ends at this share of the budget from hard patches",
                                    bounds=UNIT)
    amlp_ratio_start: float = _key(0.4, "amlp: masking ratio at the first step", bounds=OPEN_UNIT)
    amlp_ratio_end: float = _key(0.7, "amlp: masking ratio at the last step", bounds=OPEN_UNIT)
    amlp_ccl_weight: float = _key(0.1, "amlp: weight of the category consistency loss (0 turns it off)",
                                  bounds=AT_LEAST_0)
    amlp_ccl_blend: float = _key(0.5, "amlp: CCL target = (1 - blend) * k-means lesion cluster + blend * hard patch",
                                 bounds=UNIT)
    # losses
    contrastive_weight: float = _key(0.1, "tcm: weight of InfoNCE between the two masked views", bounds=AT_LEAST_0)
    temperature: float = _key(0.2, "tcm: InfoNCE temperature", bounds=POSITIVE)
    ema: float = _key(0.99, "anatomask: momentum of the EMA teacher (the ramp's start when ema_end is set)",
                      bounds=Bounds(0, 1, hi_open=True))
    ema_end: float | None = _key(None, "anatomask: momentum reached, linearly from ema, at a quarter of the steps "
                                       "(the authors': 0.999 -> 0.9999); null: ema throughout",
                                 bounds=Bounds(0, 1, hi_open=True))
    # optimisation
    steps: int = _key(200, "optimiser steps of the whole run (may grow on --resume)", bounds=AT_LEAST_1,
                      resume=GROW)
    batch_size: int = _key(8, "crops per step and rank", bounds=AT_LEAST_1)
    lr: float = _key(2e-3, "AdamW learning rate after warm-up (cosine decay to 0 at the last step)",
                     bounds=POSITIVE)
    weight_decay: float = _key(0.05, "AdamW weight decay", bounds=AT_LEAST_0)
    warmup_steps: int = _key(20, "linear learning-rate warm-up steps", bounds=AT_LEAST_0)
    seed: int = _key(0, "seed of the weights, the data stream and the masks", bounds=AT_LEAST_0)
    grad_accum_steps: int = _key(1, "micro-batches whose gradients are summed into one optimiser step",
                                 bounds=AT_LEAST_1)
    max_grad_norm: float | None = _key(None, "clip the gradients' global norm to this (null: no clipping)",
                                       bounds=POSITIVE)
    skip_nonfinite: int = _key(0, "steps with a NaN/inf loss or gradient that may be skipped (logged) before "
                                  "the run stops", bounds=AT_LEAST_0, resume=FREE)
    num_workers: int = _key(2, "DataLoader worker processes building batches (0: in the training process)",
                            bounds=AT_LEAST_0, resume=FREE)
    prefetch_factor: int = _key(2, "batches each loader worker prepares ahead", bounds=AT_LEAST_1, resume=FREE)
    # where and how it runs
    device: str = _key("auto", "auto: cuda:$LOCAL_RANK under torchrun with CUDA, else cuda if available, else cpu",
                       resume=FREE, allowed="auto | cpu | cuda | cuda:N",
                       check=lambda v: _DEVICE.fullmatch(v) is not None)
    precision: str = _key("auto", "autocast dtype; auto: bf16 on CUDA devices that support it, fp32 on CPU; fp16 "
                                  "uses a GradScaler", choices=PRECISIONS)
    compile: bool = _key(False, "compile the model step with torch.compile", resume=FREE)
    backend: str | None = _key(None, "tcm_kernels back end; null: the ops' own choice; reference: the "
                                     "dense-emulation ops", choices=(None, *BACKENDS), resume=FREE)
    # output
    out_dir: str = _key("runs/pretrain", "folder of checkpoint.pt, log.csv, images and the run lock", resume=FREE)
    log_every: int = _key(10, "flush log.csv every this many steps (and at every checkpoint)", bounds=AT_LEAST_1,
                          resume=FREE)
    image_every: int = _key(100, "write an image | masked | reconstruction PNG every this many steps (0: never)",
                            bounds=AT_LEAST_0, resume=FREE)
    checkpoint_every: int = _key(50, "write checkpoint.pt every this many steps (and at the last)",
                                 bounds=AT_LEAST_1, resume=FREE)

    def __post_init__(self) -> None:
        hints = _hints()
        for f in dataclasses.fields(self):
            value = _convert(f.name, getattr(self, f.name), hints[f.name])
            _check_value(f, value)
            setattr(self, f.name, value)
        if self.dim == 2 and is_3d_encoder(self.encoder):
            raise ConfigError(f"config: encoder {self.encoder!r} is a 3-D encoder, but dim is 2; leave dim unset "
                              f"(or 3) for it, or pick a 2-D encoder such as resnet_tiny")
        if method_class(self.method).needs_saliency and not self.prompts:
            raise ConfigError(f"config: prompts must be a non-empty list of text for method {self.method} (its text "
                              f"guidance), got []")
        if any(not p.strip() for p in self.prompts):
            raise ConfigError(f"config: prompts must not contain empty text, got {self.prompts!r}")
        if self.method == "amlp" and self.mask_ratio is not None:
            raise ConfigError(f"config: mask_ratio is not used by method amlp (its ratio ramps from amlp_ratio_start "
                              f"to amlp_ratio_end), got {self.mask_ratio}; set amlp_ratio_end instead")
        if self.localizer == "atlas" and self.atlas is None and self.dataset not in ATLASES:
            raise ConfigError(f"config: localizer=atlas needs atlas=brain_mri or atlas=chest_ct for dataset "
                              f"{self.dataset!r}")
        if self.localizer == "clipseg" and not self.clipseg_checkpoint:
            raise ConfigError("config: localizer=clipseg needs clipseg_checkpoint=DIR (a local CLIPSeg checkpoint)")
        patch = encoder_patch_size(self.encoder)
        if self.decoder == "spark" and self.decoder_width < patch:
            raise ConfigError(f"config: decoder_width must be at least the patch size {patch} for decoder spark (its "
                              f"width halves once per 2x up to the image), got {self.decoder_width}")
        if self.image_size % patch:
            raise ConfigError(f"config: image_size {self.image_size} must be a multiple of the encoder's patch size "
                              f"{patch} (encoder {self.encoder!r})")

    @property
    def spatial_dims(self) -> int:
        """2 or 3: ``dim`` if set, else 3 for a 3-D encoder and 2 for every other one."""
        if self.dim is not None:
            return self.dim
        return 3 if is_3d_encoder(self.encoder) else 2

    def ratio_at(self, step: int) -> float:
        """The overall masking ratio at ``step``: the method's rule (``Method.ratio_at``)."""
        return method_class(self.method).ratio_at(self, step)

    def ema_at(self, step: int) -> float:
        """AnatoMask's teacher momentum after optimiser step ``step``: ``ema``, or the linear ramp from ``ema``
        to ``ema_end`` over the first quarter of ``steps`` (the authors' schedule), then ``ema_end``."""
        if self.ema_end is None:
            return self.ema
        t = min(step / max(0.25 * self.steps, 1), 1.0)
        return self.ema + t * (self.ema_end - self.ema)

    def hard_fraction_at(self, step: int) -> float:
        """AnatoMask's curriculum: the hard share of the budget grows linearly to ``hard_fraction_max``."""
        return min((step + 1) / max(self.steps, 1), 1.0) * self.hard_fraction_max

    def to_dict(self) -> dict:
        """The config as plain types (str, int, float, bool, None, lists): what checkpoints store."""
        return dataclasses.asdict(self)


def is_3d_encoder(name: str) -> bool:
    """Encoders named for volumes (``resnet3d``, ``resnet3d_tiny``): their configs are sized for 3-D.

    Every other encoder is 2-D by default but may be built 3-D with an explicit ``dim: 3``.
    """
    return "3d" in name.lower()


def _hints() -> dict[str, object]:
    return typing.get_type_hints(PretrainConfig)


def _split_optional(tp) -> tuple[object, bool]:
    """(the type without None, whether None is allowed) for ``X`` or ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def type_name(tp) -> str:
    """How ``--help`` and errors name a key's type: int, float, bool, str, list[str], with ``| null``."""
    base, optional = _split_optional(tp)
    name = "list[str]" if typing.get_origin(base) is list else base.__name__
    return f"{name} | null" if optional else name


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(name: str, value, tp):
    """``value`` (typed, from YAML or Python, or text, from ``key=value``) as the declared type ``tp``."""
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"config: {name} must be {_a(type_name(tp))}, got null")

    def wrong(extra: str = ""):
        return ConfigError(f"config: {name} must be {_a(type_name(tp))}, got {value!r}{extra}")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong(" (true or false)")
    if base is int:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, str):
            try:
                value_ = float(value) if any(c in value.lower() for c in ".e") else int(value)
            except ValueError:
                raise wrong() from None
        else:
            value_ = value
        if isinstance(value_, float) and math.isfinite(value_) and value_.is_integer():
            return int(value_)  # steps=1e4 (a float in YAML and Python) means 10000
        if isinstance(value_, int):
            return value_
        raise wrong()
    if base is float:
        if isinstance(value, bool):
            raise wrong()
        try:
            number = float(value)  # text included: YAML 1.1 reads 1e-3 as a string
        except (TypeError, ValueError):
            raise wrong() from None
        if not math.isfinite(number):
            raise wrong(" (a finite number)")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        raise wrong(" (quote it in YAML)")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml

                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise wrong(" (a YAML list such as [a, b] or comma-separated text)") from None
            else:
                value = [s.strip() for s in text.split(",") if s.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            return list(value)
        raise wrong(" (a list of text: [a, b] or a,b)")
    raise TypeError(f"config: key {name} has a type the config cannot read: {tp!r}")  # a bug of this module


def _check_value(f: dataclasses.Field, value) -> None:
    meta = f.metadata
    if value is None:
        return  # a null passed _convert only for keys declared `X | None`
    choices, bounds, check = meta.get("choices"), meta.get("bounds"), meta.get("check")
    if choices is not None and value not in choices:
        shown = " | ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"config: {f.name} must be one of {shown}, got {value!r}")
    if bounds is not None and value not in bounds:
        raise ConfigError(f"config: {f.name} must be {bounds}, got {value!r}")
    if check is not None and not check(value):
        raise ConfigError(f"config: {f.name} must be {meta['allowed']}, got {value!r}")


def allowed_values(f: dataclasses.Field) -> str:
    """What ``--help`` shows as a key's allowed values ('' when any value of its type is)."""
    meta = f.metadata
    if meta.get("choices") is not None:
        return " | ".join("null" if c is None else str(c) for c in meta["choices"])
    if meta.get("bounds") is not None:
        return str(meta["bounds"])
    return meta.get("allowed") or ""


def describe_keys() -> str:
    """Every config key, one line each: ``name  type = default  (allowed)  meaning``; for ``--help``."""
    hints = _hints()
    rows = []
    for f in dataclasses.fields(PretrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else repr(default)
                                                if isinstance(default, (str, list)) else str(default))
        allowed = allowed_values(f)
        rows.append((f.name, f"{type_name(hints[f.name])} = {shown}", allowed,
                     f.metadata.get("help", "")))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = []
    for name, typed, allowed, meaning in rows:
        lines.append(f"  {name:<{w0}}  {typed:<{w1}}  {meaning}" + (f" [{allowed}]" if allowed else ""))
    return "\n".join(lines)


def keys_with_resume_rule(rule: str) -> list[str]:
    """The keys declared with ``resume=rule`` (FREE, GROW, CHANGES or FIXED), in declaration order."""
    return [f.name for f in dataclasses.fields(PretrainConfig) if f.metadata.get("resume", CHANGES) == rule]


def _unknown_key(key: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(PretrainConfig)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; tcm-pretrain --help lists every key"
    return ConfigError(f"config: unknown key {key!r} in {source}{hint}")


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; converted and validated.

    Raises :class:`ConfigError` naming the file or override, the key, the value and what is allowed.
    """
    import yaml

    values: dict = {}
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    if path is not None:
        path = pathlib.Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(f"config: cannot read the config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must be a YAML mapping of key: value, got a "
                              f"{type(loaded).__name__}")
        for key in loaded:
            if key not in names:
                raise _unknown_key(str(key), str(path))
        values.update(loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"config: overrides are key=value, got {item!r}")
        if key not in names:
            raise _unknown_key(key, f"override {item!r}")
        values[key] = raw
    return PretrainConfig(**values)


def config_from_dict(stored: dict, source: str) -> PretrainConfig:
    """A config stored as plain types (in a checkpoint); keys added since it was written take their defaults."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(stored) - names)
    if unknown:
        raise ConfigError(f"config: {source} has config keys {unknown} that this version does not know")
    try:
        return PretrainConfig(**stored)
    except ConfigError as err:  # e.g. ema 5, accepted before values were validated
        raise ConfigError(f"{source}: its stored config is not valid: {err}") from None


def resume_changes(stored: dict, cfg: PretrainConfig, *, source: str) -> tuple[dict[str, tuple], list[str]]:
    """How ``cfg`` differs from the config ``stored`` in a checkpoint, by each key's ``resume`` rule.

    Returns ``(changes, fixed)``: ``changes`` maps each key whose difference changes the run to
    ``(old, new)``; ``fixed`` lists, as ``"key old -> new"``, differences no resume can apply (the
    checkpoint's tensors would not fit).
    """
    old = config_from_dict(stored, source).to_dict()
    new = cfg.to_dict()
    changes, fixed = {}, []
    for f in dataclasses.fields(PretrainConfig):
        a, b = old[f.name], new[f.name]
        rule = f.metadata.get("resume", CHANGES)
        if a == b or rule == FREE or (rule == GROW and b >= a):
            continue
        if rule == FIXED:
            fixed.append(f"{f.name} {a!r} -> {b!r}")
        else:
            changes[f.name] = (a, b)
    return changes, fixed
