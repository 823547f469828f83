"""Every Triton kernel of the sparse norms and the recon loss compiles to PTX for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

import pytest

from tests.triton_compile import SHARED_LIMIT, arch, compile_kernels

KERNELS = [("sparse_norm", "_moments_kernel", {"BLOCK": 1024}), ("sparse_norm", "_scale_shift_kernel", {"BLOCK": 1024}),
           ("sparse_norm", "_grad_moments_kernel", {"BLOCK": 1024}),
           ("sparse_norm", "_norm_backward_kernel", {"BLOCK": 1024}),
           *[("sparse_norm", f"_segment_{name}_kernel", {flag: True, "BLOCK_R": 32, "BLOCK_C": 32})
             for name, flag in (("moments", "HAS_ORDER"), ("grad_moments", "HAS_ORDER"), ("scale_shift", "HAS_SEG"),
                                ("norm_backward", "HAS_SEG"))],
           ("recon_loss", "_forward_kernel", {"NORM_PIX": True, "BLOCK": 512}),
           ("recon_loss", "_backward_kernel", {"NORM_PIX": True, "BLOCK": 512})]


def _signature(fn, dt: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name == "MASK":
            sig[name] = "*i1"
        elif name in ("ORDER", "OFFSETS", "SEG"):
            sig[name] = "*i64"
        elif name in ("X", "Y", "DY", "DX", "P", "T", "GRAD"):
            sig[name] = f"*{dt}"
        elif name.isupper() and name not in ("C", "L", "N", "D", "H", "W", "SPLITS", "BLOCK", "NORM_PIX"):
            sig[name] = "*fp32"
        elif name == "eps":
            sig[name] = "fp32"
        elif name not in ("BLOCK", "NORM_PIX", "BLOCK_R", "BLOCK_C", "HAS_ORDER", "HAS_SEG"):
            sig[name] = "i32"
    return sig


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    import importlib

    jobs = []
    for cap in SHARED_LIMIT:
        for dt in ("fp32", "fp16", "bf16"):
            for module, name, consts in KERNELS:
                fn = getattr(importlib.import_module(f"tcm_kernels.triton.{module}"), name)
                jobs.append({"name": f"sm{cap}-{dt}-{name}", "kernel": f"tcm_kernels.triton.{module}:{name}",
                             "signature": _signature(fn, dt), "constexprs": consts, "cap": cap})
    return compile_kernels(jobs)


def test_triton_kernels_compile_to_ptx_for_sm80_and_sm90(report):
    assert len(report) == 2 * 3 * len(KERNELS), sorted(report)
    for name, entry in report.items():
        cap = int(name[2:4])
        assert entry["target"] == arch(cap) and entry["entry"] and entry["cubin_bytes"] > 0, (name, entry)
        assert entry["shared"] <= SHARED_LIMIT[cap] and entry["stack"] == 0, (name, entry)
