"""Loading of the compiled extension and the back-end choice shared by every op.

Dispatch rule: a CUDA tensor goes to the Triton kernel (or the CUDA kernel where
the design asks for one, and to the CUDA kernel when Triton is not installed), a CPU
tensor to the compiled C++ kernel, and any op
falls back to its plain-PyTorch reference when the compiled extension is missing.
``backend=`` forces one of ``"reference" | "cpu" | "triton" | "cuda"``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("tcm_kernels")

BACKENDS = ("reference", "cpu", "triton", "cuda")

try:  # the package stays importable (reference back end only) without the build
    importlib.import_module("tcm_kernels._C")
    _LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _LOAD_ERROR = str(exc)
    log.warning("tcm_kernels: compiled kernels not loaded (%s); using the PyTorch reference", exc)


@torch.compiler.assume_constant_result  # registration does not change while a graph runs
def compiled_available(op: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.tcm.<op>`` has a kernel registered for ``device_type``."""
    if _LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tcm::{op}", key)


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(op: str, device: torch.device, backend: str | None, *, has_cuda_kernel: bool = False,
                   prefer_cuda_kernel: bool = False) -> str:
    """Resolve the back end for ``op`` on ``device``; raise if a forced one cannot run there."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        if device.type == "cuda":
            cuda_kernel = has_cuda_kernel and compiled_available(op, "cuda")
            if prefer_cuda_kernel and cuda_kernel:
                return "cuda"
            if triton_available():
                return "triton"
            return "cuda" if cuda_kernel else "reference"  # a compiled GPU kernel before the reference
        return "cpu" if compiled_available(op, "cpu") else "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got device {device}")
        if not compiled_available(op, "cpu"):
            raise RuntimeError(f"{op}: backend='cpu' requested but the compiled kernels are not built ({_LOAD_ERROR})")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got device {device}")
        if not (has_cuda_kernel and compiled_available(op, "cuda")):
            raise RuntimeError(f"{op}: backend='cuda' requested but no CUDA kernel is built for this op")
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    return backend
