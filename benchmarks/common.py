"""What every benchmark records: group, provider, baseline flag, shape, peak memory.

Peak memory on the CPU is the rise of the process's peak resident set while the
call runs: /proc/self/clear_refs resets VmHWM, then VmHWM - VmRSS(before) is read
after one call. It counts every allocation (PyTorch's CPU allocator returns
large blocks to the OS on free), so baselines and our kernels are measured alike.
On CUDA it is torch.cuda.max_memory_allocated over the call.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Extra peak memory of one call of ``fn`` over what was resident before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1  # not Linux or not permitted: reported as unknown
    before = _status_bytes("VmRSS")
    fn()
    return max(_status_bytes("VmHWM") - before, 0)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def run(benchmark, fn: Callable[[], object], *, group: str, provider: str, baseline: bool = False,
        flops: float | None = None, bytes_moved: float | None = None, device: str = "cpu", **info) -> None:
    """Time ``fn`` under ``benchmark`` and attach what the runner's tables need.

    ``flops``/``bytes_moved`` per call turn the median into GFLOP/s / GB/s in the tables.
    """
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, device=device, machine=machine(),
                                torch=torch.__version__, **info)
    if flops is not None:
        benchmark.extra_info["flops"] = flops
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = bytes_moved
    if not benchmark.disabled:
        fn()  # warm-up outside the memory probe (first-call allocations, lazy init)
        benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(fn, device)
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
