import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where Triton tests put their tensors: the GPU when present, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
