"""info_nce(gather=True) on 2 processes (gloo, CPU) against one process on the concatenated batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tcm_kernels
from tests.utils import assert_close_verbose, backend_param

WORLD = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, a_full: torch.Tensor, b_full: torch.Tensor, temperature: float, symmetric: bool,
            backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        local = a_full.shape[0] // WORLD
        rows = slice(rank * local, (rank + 1) * local)
        a = a_full[rows].clone().requires_grad_()
        b = b_full[rows].clone().requires_grad_()
        t = torch.tensor(temperature, requires_grad=True)
        loss = tcm_kernels.info_nce(a, b, temperature=t, symmetric=symmetric, gather=True, block_size=8,
                                    backend=backend)
        loss.backward()
        # What DDP does with parameter gradients: average them over the ranks.
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        dist.all_reduce(t.grad)
        torch.save({"loss": mean_loss / WORLD, "grad_a": a.grad, "grad_b": b.grad, "grad_t": t.grad / WORLD},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(*args) -> None:
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-process gloo run did not finish in {TIMEOUT_S} s")


# The compiled kernel is what runs in practice; the reference back end shares the gather code.
@pytest.mark.parametrize("backend", [backend_param("info_nce_lse", "cpu")])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_matches_single_process_on_concatenated_batch(backend, symmetric, tmp_path):
    g = torch.Generator().manual_seed(0)
    a_full = torch.randn(2 * 11, 6, generator=g)  # 11 rows per rank: several 8-row tiles, ragged
    b_full = a_full + 0.5 * torch.randn(2 * 11, 6, generator=g)
    _run_two_ranks(_free_port(), a_full, b_full, 0.3, symmetric, backend, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    a, b = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    t = torch.tensor(0.3, requires_grad=True)
    loss = tcm_kernels.info_nce(a, b, temperature=t, symmetric=symmetric, backend="reference")
    loss.backward()
    # Each rank's feature gradient sums every rank's local-mean loss; the single-process loss is
    # their mean over the ranks, so the gathered gradient is WORLD times the single-process one.
    grad_a = torch.cat([r["grad_a"] for r in ranks]) / WORLD
    grad_b = torch.cat([r["grad_b"] for r in ranks]) / WORLD
    tol = dict(atol=1e-6, rtol=1e-5)
    assert_close_verbose(ranks[0]["loss"], loss, name="loss", **tol)
    assert_close_verbose(grad_a, a.grad, name="grad_a", **tol)
    assert_close_verbose(grad_b, b.grad, name="grad_b", **tol)
    assert_close_verbose(ranks[1]["grad_t"], t.grad, name="grad_t", **tol)
