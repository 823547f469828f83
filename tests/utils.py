"""Helpers shared by the op tests."""

from __future__ import annotations

import pytest
import torch

from tcm_kernels import _backend

# Back ends under test, each skipped with the reason it cannot run here.
_NOT_BUILT = "compiled kernels not built (tcm_kernels._C missing this op)"


def backend_param(op: str, backend: str):
    """pytest.param for ``backend`` of ``op`` with a skip mark when it cannot run on this machine."""
    marks = []
    if backend == "cpu" and not _backend.compiled_available(op, "cpu"):
        marks.append(pytest.mark.skip(reason=_NOT_BUILT))
    if backend == "triton" and not _backend.triton_available():
        marks.append(pytest.mark.skip(reason="triton not installed"))
    if backend == "cuda":
        marks.append(pytest.mark.gpu)
        if torch.cuda.is_available() and not _backend.compiled_available(op, "cuda"):
            marks.append(pytest.mark.skip(reason="extension built without CUDA"))
    return pytest.param(backend, marks=marks, id=backend)


def device_for(backend: str) -> torch.device:
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                         name: str = "") -> None:
    """torch.testing.assert_close, but report how many elements differ and the first few."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ "
                             f"(atol={atol}, rtol={rtol}); first: {pairs}; "
                             f"max abs diff {(actual - expected).abs().max().item():.3e}")


def max_err_vs_oracle(fn, inputs_fp64, dtype):
    """flash-attention rule helper: max |fn(x in dtype) - fn(x in fp64)|."""
    oracle = fn(*inputs_fp64)
    low = fn(*[t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs_fp64])
    return (low.double() - oracle).abs().max().item()


def run_without_interpreter(script: str) -> dict:
    """Run ``script`` in a fresh Python without TRITON_INTERPRET and return the JSON on its last stdout line.

    PTX compile checks need this: under TRITON_INTERPRET=1, triton.jit builds interpreted
    functions that triton.compile cannot lower.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loss_weights(shape) -> torch.Tensor:
    """Fixed, non-uniform loss weights sin(0), sin(1), ... shaped ``shape`` (a gradient that tells rows apart)."""
    return torch.arange(torch.Size(shape).numel()).reshape(shape).sin()


def _sync_bn_worker(rank, init_file, parts, weight, bias, out_dir):
    import os

    import torch.distributed as dist

    from tcm_kernels import SparseTensor
    from tcm_kernels.nn import SparseSyncBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(parts))
    try:
        bn = SparseSyncBatchNorm(weight.shape[0])
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        part = parts[rank]
        if isinstance(part, SparseTensor):
            leaf = part.features.clone().requires_grad_()
            y = bn(part.replace_features(leaf)).features
        else:
            x, mask = part
            leaf = x.clone().requires_grad_()
            y = bn(leaf, mask)
        (y * loss_weights(y.shape)).sum().backward()
        torch.save({"y": y.detach(), "dx": leaf.grad, "dw": bn.weight.grad, "rv": bn.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sync_batch_norm_ranks(parts, weight: torch.Tensor, bias: torch.Tensor) -> list[dict]:
    """Run ``SparseSyncBatchNorm`` on one gloo process per part and return each rank's results.

    parts: per rank, (x, mask) masked-dense or a SparseTensor; each rank's loss is
    ``(y * loss_weights(y.shape)).sum()``. Returns per rank {"y", "dx", "dw", "rv" (running_var)}.
    """
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_bn_worker, args=(os.path.join(tmp, "init"), parts, weight, bias, tmp), nprocs=len(parts),
                 join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(len(parts))]
