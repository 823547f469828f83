"""Dtype rules shared by every back end."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and statistics are accumulated in: fp64 for fp64 inputs, fp32 for fp32/fp16/bf16."""
    return torch.float64 if dtype == torch.float64 else torch.float32
