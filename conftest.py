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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (lent GPU machine: pytest -m gpu)")
    for item in items:
        # the marker, not item.keywords: those also hold directory names (a checkout named "gpu")
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
