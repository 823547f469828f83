"""What every benchmark records: group, provider, baseline flag, shape, peak memory.

Peak memory on the CPU is the peak of bytes held by PyTorch's CPU allocator over one
call, above what was allocated before it, from the profiler's allocation events
(``profile_memory=True``: every alloc/free with its size, summed in time order). The
resident set size cannot serve: memory that glibc reuses from earlier calls is never
returned to the OS, so a second call shows no rise. On CUDA it is
torch.cuda.max_memory_allocated over the call.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU-allocator bytes during ``fn()`` relative to its start (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Extra peak memory of one call of ``fn`` over what was resident before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return allocator_peak_bytes(fn)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest vector ISA ATen dispatches to (``AVX2``/``AVX512``/``DEFAULT``), plus ``+AMX`` when the CPU has it."""
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            if any(line.startswith("flags") and " amx_tile" in line for line in f):
                isa += "+AMX"
    except OSError:
        pass
    return isa


def machine_info() -> dict[str, str | int]:
    """What every results row records: device, CPU model, ISA, threads and library versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"machine": machine(), "cpu_model": cpu_model(), "isa": cpu_isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} CPU x{torch.get_num_threads()} threads"


def run(benchmark, fn: Callable[[], object], *, group: str, provider: str, baseline: bool = False,
        flops: float | None = None, bytes_moved: float | None = None, device: str = "cpu", **info) -> None:
    """Time ``fn`` under ``benchmark`` and attach what the runner's tables need.

    ``flops``/``bytes_moved`` per call turn the median into GFLOP/s / GB/s in the tables.
    """
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, device=device, **machine_info(), **info)
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
