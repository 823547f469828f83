"""Fine-tuning configuration: every field is a ``tcm-finetune --flag`` (``--label-fraction 0.1``)."""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass

from ..errors import UserError

SEMI_MODES = ("none", "mean_teacher", "corn")


@dataclass
class FinetuneConfig:
    # data
    task: str = "chest_ct"  # "chest_ct" (embedded organ task) or a folder of NIfTI / DICOM / PNG images
    label_dir: str | None = None  # folder tasks: label maps with the images' names (required for a folder)
    label_names: str | None = None  # folder tasks: text file of "id name" lines
    dim: int = 2  # 2: axial slices; 3: sub-volumes (slabs of `depth` slices)
    image_size: int = 160  # in-plane side the images are padded/cropped to (a multiple of the encoder's stride)
    depth: int = 16  # 3-D: slices per sub-volume (a multiple of the encoder's stride)
    label_fraction: float = 0.1  # share of the training samples that keep their labels; the rest are unlabelled
    # model
    encoder: str = "resnet_tiny"  # tcm_mim.models.build_encoder name (3-D: resnet3d_tiny, resnet3d)
    checkpoint: str | None = None  # a tcm-pretrain checkpoint.pt whose encoder initialises ours; None: random
    decoder_width: int = 64
    # method
    semi: str = "corn"  # none | mean_teacher | corn
    consistency_weight: float = 1.0  # mean teacher: MSE between student and teacher softmax on unlabelled data
    ccm_weight: float = 0.1  # corn: per-class CORAL between labelled and unlabelled decoder features
    dfp_weight: float = 0.1  # corn: similarity-matrix consistency against the dynamic feature pool
    rampup_steps: int = 40  # sigmoid ramp-up exp(-5 (1 - t)^2) of every unlabelled term
    ema: float = 0.99  # teacher decay (Tarvainen & Valpola: min(1 - 1 / (step + 1), ema))
    tau: float = 0.6  # corn: teacher confidence above which an unlabelled feature is kept (CCM and the pool)
    pool_size: int = 2048  # corn: rows in the dynamic feature pool (a tcm_kernels.CovarianceQueue)
    similarity_temperature: float = 0.1  # corn: temperature of the cosine-similarity softmax of the DFP term
    max_rows: int = 1024  # corn: feature rows per class (CCM) and per step (DFP), subsampled beyond it
    noise_std: float = 0.05  # perturbation of unlabelled inputs: Gaussian noise (clipped at 2 std) ...
    intensity: float = 0.1  # ... intensity scale/shift jitter, and random flips (student only)
    # optimisation
    steps: int = 200
    batch_size: int = 4  # labelled images per step
    unlabelled_batch_size: int = 4  # unlabelled images per step (mean_teacher, corn)
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0  # initialisation, batches, perturbations and which training samples keep labels
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...
    # output
    out_dir: str = "runs/finetune"
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise UserError(f"FinetuneConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        if self.task != "chest_ct" and not pathlib.Path(self.task).is_dir():
            fail("task", "'chest_ct' or an existing folder")
        if self.task != "chest_ct" and self.label_dir is None:
            raise UserError(f"FinetuneConfig: label_dir is required for the folder task {self.task!r} (label maps "
                             f"with the images' names)")
        if self.device != "auto":
            import torch

            try:
                device = torch.device(self.device)
            except RuntimeError:
                fail("device", "auto, cpu, cuda or cuda:<index>")
            if device.type == "cuda" and not torch.cuda.is_available():
                fail("device", "available (CUDA is not, here)")
        if self.semi not in SEMI_MODES:
            fail("semi", f"one of {SEMI_MODES}")
        if self.dim not in (2, 3):
            fail("dim", "2 or 3")
        if not 0.0 < self.label_fraction <= 1.0:
            fail("label_fraction", "in (0, 1]")
        if self.semi != "none" and self.label_fraction == 1.0:
            fail("label_fraction", f"< 1 for semi={self.semi!r} (no scan would be left unlabelled)")
        if not 0.0 <= self.tau < 1.0:
            fail("tau", "in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            fail("ema", "in [0, 1)")
        for name in ("consistency_weight", "ccm_weight", "dfp_weight", "noise_std", "intensity", "weight_decay",
                     "rampup_steps"):
            if getattr(self, name) < 0:
                fail(name, ">= 0")
        for name in ("image_size", "depth", "steps", "batch_size", "unlabelled_batch_size", "log_every",
                     "checkpoint_every", "decoder_width"):
            if getattr(self, name) < 1:
                fail(name, ">= 1")
        for name in ("pool_size", "max_rows"):
            if getattr(self, name) < 2:
                fail(name, ">= 2")
        if self.similarity_temperature <= 0 or self.lr <= 0:
            fail("similarity_temperature" if self.similarity_temperature <= 0 else "lr", "> 0")

    @property
    def uses_teacher(self) -> bool:
        return self.semi != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
