"""The tests' one PTX/cubin compile harness: Triton kernels compiled for sm_80 / sm_90 without a GPU.

Under ``TRITON_INTERPRET=1`` (set by conftest.py for the CPU suite) ``triton.jit`` builds interpreted
functions that ``triton.compile`` cannot lower, so :func:`compile_kernels` compiles in one fresh Python
without that variable and returns, per job, what a real launch would depend on:

* ``target`` (the PTX ``.target``), ``entry`` (the kernel's entry is in the PTX), ``cubin_bytes``;
* ``shared``: ``metadata.shared``, the bytes of shared memory the launch asks for. Triton checks it
  against the device only at launch, so a kernel over the limit compiles fine and fails on the GPU;
* ``regs``, ``stack`` (bytes of stack frame per thread: register spills and local arrays) and ``local``,
  read with the ``cuobjdump -res-usage`` that Triton's NVIDIA back end ships;
* ``ptx`` when ``want_ptx`` is set.

A job is a dict: ``name`` (key of the result), ``kernel`` ("module:function"), ``signature`` (argument
name -> Triton type such as ``"*fp32"`` or ``"i32"``; constexpr arguments may be left out), ``constexprs``,
``cap`` (80 or 90) and ``options`` (``num_warps``, ``num_stages``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Opt-in shared memory per block of the two targets (tcm_kernels.triton._launch.SHARED_MEMORY).
SHARED_LIMIT = {80: 166912, 90: 232448}

_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget

jobs, want_ptx = json.loads(sys.stdin.read())
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
report = {}
with tempfile.TemporaryDirectory() as tmp:
    for job in jobs:
        module, name = job["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        consts = job.get("constexprs", {})
        sig = {**job["signature"], **{n: "constexpr" for n in consts}}
        missing = [n for n in fn.arg_names if n not in sig]
        if missing:
            raise SystemExit(f"{job['name']}: no type for arguments {missing}")
        sig = {n: sig[n] for n in fn.arg_names}
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", job["cap"], 32), options=job.get("options", {}))
        ptx = k.asm["ptx"]
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        res = dict((key, int(val)) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
        entry = {"target": re.search(r"\.target\s+(\S+)", ptx).group(1), "entry": name in ptx,
                 "cubin_bytes": len(k.asm["cubin"]), "shared": k.metadata.shared, "regs": res["REG"],
                 "stack": res["STACK"], "local": res["LOCAL"], "num_warps": k.metadata.num_warps,
                 "num_stages": k.metadata.num_stages}
        if want_ptx:
            entry["ptx"] = ptx
        report[job["name"]] = entry
print(json.dumps(report))
"""


def compile_kernels(jobs: list[dict], want_ptx: bool = False, timeout: float = 1800) -> dict[str, dict]:
    """Compile every job (see the module docstring) in one fresh interpreter; {job name: result}."""
    names = [job["name"] for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"compile_kernels: job names must be unique, got {names}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps([jobs, want_ptx]), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def arch(cap: int) -> str:
    """The PTX target Triton writes for compute capability ``cap`` (sm_90 gets the arch-specific sm_90a)."""
    return "sm_90a" if cap == 90 else f"sm_{cap}"


def assert_conv_kernel(entry: dict, cap: int, tensor_cores: bool) -> None:
    """A convolution kernel's compile result (``want_ptx``): right target, shared memory within the target's
    limit, no stack (spills), and tensor-core ``mma`` instructions exactly when ``tensor_cores``."""
    assert entry["target"] == arch(cap) and entry["entry"] and entry["cubin_bytes"] > 0, entry["target"]
    assert entry["shared"] <= SHARED_LIMIT[cap] and entry["stack"] == 0, (entry["shared"], entry["stack"])
    assert ("mma" in entry["ptx"]) == tensor_cores, (cap, tensor_cores)
