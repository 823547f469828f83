"""What every Triton launch of tcm_kernels shares: device guard, grid limits, shared-memory limit.

* :func:`launch` runs ``kernel[grid](...)`` under a guard for the tensors' device. Triton launches on the
  *current* CUDA device and its current stream, so a tensor on ``cuda:1`` while device 0 is current would
  otherwise be read by a kernel on the wrong GPU.
* :func:`check_grid` rejects a grid that CUDA cannot launch (dimension 0 up to 2^31 - 1 programs,
  dimensions 1 and 2 up to 65,535) with an error naming the op, instead of Triton's launch failure.
  Launchers build their grids so that every input the op accepts fits (see each launcher).
* :func:`shared_memory_limit` is the opt-in shared memory per block of a device, from which launchers
  choose tile sizes and pipeline stages (A100: 166,912 B, H100/H200: 232,448 B).
"""

from __future__ import annotations

import contextlib
import functools

import torch

# CUDA's limits on the number of programs (thread blocks) per grid dimension.
MAX_GRID = (2**31 - 1, 65535, 65535)
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the targets we compile for.
SHARED_MEMORY = {80: 166912, 90: 232448}


def check_grid(op: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` unchanged if CUDA can launch it; else ValueError naming ``op``, the dimension and the limit."""
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{op}: a launch grid has 1 to 3 dimensions, got {grid}")
    for dim, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(f"{op}: input too large for one launch: grid dimension {dim} would need {size} "
                             f"programs, CUDA allows at most {limit}")
    return tuple(grid)


def device_guard(device: torch.device):
    """Context manager making ``device`` the current CUDA device (no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(op: str, kernel, grid: tuple[int, ...], device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``device`` after :func:`check_grid`; empty grids launch nothing."""
    check_grid(op, grid)
    if min(grid) == 0:
        return
    with device_guard(device):
        kernel[grid](*args, **kwargs)


@functools.cache
def _cuda_shared_memory(index: int) -> int:
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device``; the A100's limit for the CPU interpreter."""
    if device.type != "cuda":
        return SHARED_MEMORY[80]  # the interpreter ignores stages; keep the choice identical to a real A100
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_shared_memory(index)
