"""Root pytest configuration shared by tests/ and benchmarks/.

Without a GPU, Triton kernels run through the interpreter on CPU tensors;
TRITON_INTERPRET must be set before triton.jit decorates anything, so it is set
here, before any test or benchmark module imports tcm_kernels.triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def exact_fp32() -> None:
    """fp32 references in exact fp32 on a GPU: cuDNN convolutions default to TF32 (~1e-3 relative error),
    which the tests' fp32 tolerances (2e-5 to 2e-4) would charge to our kernels."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9; the legacy flags must not be mixed in
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


exact_fp32()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (on a GPU machine: make gpu-check)")
    for item in items:
        # the marker, not item.keywords: those also hold directory names (a checkout named "gpu")
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
