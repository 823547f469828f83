"""A few small cases of every op on the GPU, each checked against the reference: the cases
`make gpu-check` runs under ``compute-sanitizer --tool memcheck`` and, until tcm-pretrain takes
``device=cuda``, its ops-alone training smoke test.

Usage: ``python scripts/gpu_smoke.py [--json PATH]``; exits 1 if any case fails (each is reported).
``--device cpu`` with ``TRITON_INTERPRET=1`` runs the same cases on the CPU (no CUDA kernels), to check
the script itself.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

import tcm_kernels

DEV = torch.device("cuda")
from tcm_kernels.reference import submconv as ref_conv


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if not err <= tol * max(want.abs().max().item() if want.numel() else 0.0, 1.0):
        raise AssertionError(f"{name}: max abs error {err:.3e} > {tol:g} x scale")


def sample_mask_cases() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (196, 4096, 20011):  # 20011 > 16384: the default back end goes to the CUDA kernel
        scores = torch.rand(4, n, generator=g)
        for strategy in ("uniform", "weighted", "stratified", "hardest"):
            kw = dict(strategy=strategy, seed=3, offset=1, roi_threshold=0.5, roi_mask_ratio=0.7, hard_fraction=0.5)
            want = tcm_kernels.sample_mask(scores, 0.6, backend="reference", **kw)
            backends = ["cuda", None] if DEV.type == "cuda" else []
            backends += ["triton"] if n <= 16384 else []
            for backend in backends:
                got = tcm_kernels.sample_mask(scores.to(DEV), 0.6, backend=backend, **kw)
                if not torch.equal(got.visible.cpu(), want.visible):
                    raise AssertionError(f"sample_mask {strategy} N={n} backend={backend}: mask differs")


def submconv_cases() -> None:
    g = torch.Generator().manual_seed(1)
    for nd, side, patch in ((2, 16, 4), (3, 8, 4)):
        x = torch.randn(2, 16, *(side,) * nd, generator=g)
        coarse = torch.rand(2, 1, *(side // patch,) * nd, generator=g) < 0.5
        mask = coarse
        for dim in range(2, 2 + nd):
            mask = mask.repeat_interleave(patch, dim=dim)
        w = torch.randn(24, 16, *(3,) * nd, generator=g) / (16 * 3**nd) ** 0.5
        want = ref_conv.submanifold_conv(x.double(), mask, w.double())
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            xd, wd, md = x.to(DEV).to(dtype).requires_grad_(), w.to(DEV).to(dtype), mask.to(DEV)
            runs = {"triton": dict(backend="triton", path="generic"),
                    "triton_patch": dict(backend="triton", path="patch", patch_size=patch),
                    "cuda": dict(backend="cuda")}
            for name, kw in runs.items():
                if name == "cuda" and (dtype != torch.float32 or DEV.type != "cuda"):
                    continue
                y = tcm_kernels.submanifold_conv(xd, md, wd, **kw)
                y.float().square().sum().backward()
                _close(f"submconv {nd}d {name} {dtype}", y, want, tol)
                xd.grad = None
            st = tcm_kernels.SparseTensor.from_dense(xd.detach(), md)
            y = tcm_kernels.submanifold_conv_compact(st.features, st.kernel_map(), wd, backend="triton")
            _close(f"submconv_compact {nd}d {dtype}", st.replace_features(y).dense()[0], want, tol)


def norm_loss_contrastive_cases() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 16, 16, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g) < 0.6
    for backend in ("triton",):
        y = tcm_kernels.sparse_batch_norm(x.to(DEV), mask.to(DEV), backend=backend)
        _close("sparse_batch_norm", y, tcm_kernels.sparse_batch_norm(x, mask, backend="reference"), 1e-4)
    pred, target = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    visible = torch.rand(2, 16, generator=g) < 0.4
    got = tcm_kernels.masked_recon_loss(pred.to(DEV), target.to(DEV), visible.to(DEV), 8, backend="triton")[0]
    _close("masked_recon_loss", got, tcm_kernels.masked_recon_loss(pred, target, visible, 8, backend="reference")[0],
           1e-4)
    for d, dtype, tol in ((64, torch.float32, 1e-4), (1024, torch.bfloat16, 2e-2), (4096, torch.float32, 1e-4)):
        a, b = torch.randn(300, d, generator=g), torch.randn(300, d, generator=g)
        ac, bc = a.to(DEV).to(dtype).requires_grad_(), b.to(DEV).to(dtype).requires_grad_()
        loss = tcm_kernels.info_nce(ac, bc, temperature=0.1, normalize=True, backend="triton")
        loss.backward()
        want = tcm_kernels.info_nce(a.to(dtype).double(), b.to(dtype).double(), temperature=0.1, normalize=True,
                                    backend="reference")
        _close(f"info_nce D={d} {dtype}", loss, want, tol)


CASES = {"sample_mask": sample_mask_cases, "submconv": submconv_cases,
         "norm_loss_contrastive": norm_loss_contrastive_cases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {case: {ok, seconds, error}} here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 1
    report = {}
    for name, case in CASES.items():
        start = time.perf_counter()
        try:
            case()
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            report[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        except Exception:  # every case is reported; the exit code says whether any failed
            report[name] = {"ok": False, "seconds": round(time.perf_counter() - start, 2),
                            "error": traceback.format_exc()[-3000:]}
        print(name, "ok" if report[name]["ok"] else "FAILED", report[name]["seconds"], "s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(r["ok"] for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
