"""Registration of the ``tcm::`` custom ops: one call per (op, back end).

Every op of tcm_kernels lives in the one ``tcm`` namespace: the compiled kernels under their
schema name (``csrc/ops.cpp``), their Triton twins under ``<name>_triton`` and other Python back
ends under ``<name>_<back end>``. Fakes come from :mod:`tcm_kernels._core.shapes` and autograd
from the factories of :mod:`tcm_kernels._core.autograd`, so twins share both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def register(op: str, fake: Callable, autograd: tuple[Callable, Callable] | None = None) -> None:
    """Register the fake and, for a differentiable op, the ``(backward, setup_context)`` of ``tcm::<op>``."""
    name = f"tcm::{op}"
    torch.library.register_fake(name)(fake)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(name, backward, setup_context=setup_context)
