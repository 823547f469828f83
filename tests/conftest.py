"""Shared test configuration.

Triton kernels run through the interpreter on CPU tensors when no GPU is present;
TRITON_INTERPRET must be set before triton.jit decorates anything, so it is set
here, before any test module imports tcm_kernels.triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tcm_kernels import _backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (lent GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where Triton tests put their tensors: the GPU when present, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
