"""Every Triton kernel of the sparse norms and the recon loss compiles to PTX for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations


import pytest

from tests.utils import run_without_interpreter

# Run in a fresh interpreter: under TRITON_INTERPRET=1 (set by conftest) triton.jit builds no compilable kernels.
_PTX_CHECK = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from tcm_kernels.triton import sparse_norm as sn, recon_loss as rl

def sig_for(fn, dt, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("MASK",):
            sig[name] = "*i1"
        elif name in ("X", "Y", "DY", "DX", "P", "T", "GRAD"):
            sig[name] = f"*{dt}"
        elif name.isupper() and name not in ("C", "L", "D", "H", "W"):
            sig[name] = "*fp32"
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

report = {}
kernels = [(sn._moments_kernel, {"BLOCK": 1024}), (sn._scale_shift_kernel, {"BLOCK": 1024}),
           (sn._grad_moments_kernel, {"BLOCK": 1024}), (sn._norm_backward_kernel, {"BLOCK": 1024}),
           (rl._forward_kernel, {"NORM_PIX": True, "BLOCK": 512}),
           (rl._backward_kernel, {"NORM_PIX": True, "BLOCK": 512})]
for cap in (80, 90):
    for dt in ("fp32", "fp16", "bf16"):
        for fn, consts in kernels:
            k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig_for(fn, dt, consts), constexprs=consts),
                               target=GPUTarget("cuda", cap, 32))
            report[f"sm{cap}-{dt}-{fn.__name__}"] = fn.__name__ in k.asm["ptx"]
print(json.dumps(report))
"""


def test_triton_kernels_compile_to_ptx_for_sm80_and_sm90():
    pytest.importorskip("triton")
    report = run_without_interpreter(_PTX_CHECK)
    assert len(report) == 2 * 3 * 6, sorted(report)
    assert all(report.values()), [k for k, ok in report.items() if not ok]
