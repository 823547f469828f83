"""Where and in what precision a run computes: the ``device`` and ``precision`` config keys."""

from __future__ import annotations

import os
import re

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """``device`` -> a torch.device.

    ``auto``: ``cuda:$LOCAL_RANK`` under torchrun when CUDA is available, else ``cuda`` (the
    current GPU) when available, else ``cpu``. ``cuda`` alone also means ``cuda:$LOCAL_RANK``
    under torchrun (one GPU per rank); ``cuda:N`` is taken as given.
    """
    if not isinstance(spec, str) or not (spec in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", spec)):
        raise ValueError(f"config: device must be one of {DEVICES} (N a GPU index), got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"config: device {spec!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
                         f"(a CPU-only torch build, or no visible GPU); use device=cpu or device=auto")
    if spec in ("auto", "cuda"):
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None else torch.cuda.current_device()
    else:
        index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ValueError(f"config: device {spec!r} resolves to cuda:{index}, but only {torch.cuda.device_count()} "
                         f"GPU(s) are visible")
    return torch.device("cuda", index)


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """``precision`` -> the autocast dtype (None: fp32, no autocast).

    ``auto``: bf16 on CUDA devices that support it, else fp32 (CPUs, and GPUs without bf16,
    where fp16 would need a loss scale the user should choose knowingly).
    """
    if spec not in PRECISIONS:
        raise ValueError(f"config: precision must be one of {PRECISIONS}, got {spec!r}")
    if spec == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
