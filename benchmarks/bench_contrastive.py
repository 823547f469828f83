"""InfoNCE forward + backward: tcm_kernels.info_nce vs the naive full-logits loss.

The naive provider is what a user writes without this library (the CLIP loss):
``F.cross_entropy(a @ b.T / t, arange(B))`` averaged with its transpose, which
materialises the B x B logits, their softmax and their gradient. Ours folds
tiles of the logits into log-sum-exp statistics and recomputes them in backward.
Both compute the symmetric loss on L2-normalised fp32 features with a learnable
temperature, forward and backward (gradients of a, b and the temperature).

Peak memory (``peak_mem_bytes``) is measured the same way for both providers by
benchmarks.common.peak_memory_bytes: the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) over the resident set before one
forward + backward call. Inputs exist before the call, so it counts what the loss
itself allocates: logits, softmax and gradients for the naive loss; fp32 copies,
tiles, statistics and the input gradients for ours.

The naive loss at B = 32768 would need > 12 GiB (4 GiB of logits, as much for the
softmax and for the gradient) on a shared 24 GiB machine, so it is skipped there.
With ``--benchmark-disable`` (CI) only the smallest B runs, once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tcm_kernels
from benchmarks.common import run
from tcm_kernels.reference.info_nce import naive_info_nce

D = 256
BATCHES = [4096, 16384, 32768]
NAIVE_MAX_B = 16384  # beyond this the naive B x B buffers do not fit next to the other users of the machine
TEMPERATURE = 0.07


def _setup(b: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(b, D, generator=g), dim=1).to(device).requires_grad_()
    p = F.normalize(torch.randn(b, D, generator=g), dim=1).to(device).requires_grad_()
    t = torch.tensor(TEMPERATURE, device=device, requires_grad=True)
    return a, p, t


def _step(loss_fn, a, p, t):
    def call():
        a.grad = p.grad = t.grad = None
        loss_fn(a, p, t).backward()

    return call


def _flops(b: int, provider: str) -> float:
    # GEMM work actually done: the naive loss does 1 logits GEMM forward and 2 backward; the
    # tiled loss recomputes the logits in backward (1 forward + 3 backward).
    gemms = 3 if provider == "naive" else 4
    return gemms * 2.0 * b * b * D


@pytest.mark.parametrize("b", BATCHES, ids=[f"B{b}" for b in BATCHES])
@pytest.mark.parametrize("provider", ["naive", "tcm_cpu"])
def test_info_nce_fwd_bwd(benchmark, provider, b):
    if benchmark.disabled and b != BATCHES[0]:
        pytest.skip("--benchmark-disable (CI): only the smallest B runs")
    if provider == "naive" and b > NAIVE_MAX_B:
        pytest.skip(f"naive loss at B={b} needs > 12 GiB for the B x B logits, softmax and gradient "
                    "(shared 24 GiB machine); tcm_cpu runs alone at this size")
    a, p, t = _setup(b)
    if provider == "naive":
        loss_fn = lambda x, y, tt: naive_info_nce(x, y, tt)  # noqa: E731
    else:
        loss_fn = lambda x, y, tt: tcm_kernels.info_nce(x, y, temperature=tt, backend="cpu")  # noqa: E731
    run(benchmark, _step(loss_fn, a, p, t), group=f"info_nce-fwd+bwd-B{b}-D{D}", provider=provider,
        baseline=provider == "naive", flops=_flops(b, provider), B=b, D=D, dtype="float32")


@pytest.mark.gpu
@pytest.mark.parametrize("b", BATCHES, ids=[f"B{b}" for b in BATCHES])
@pytest.mark.parametrize("provider", ["naive", "tcm_triton"])
def test_info_nce_fwd_bwd_gpu(benchmark, provider, b):
    a, p, t = _setup(b, "cuda")
    if provider == "naive":
        loss_fn = lambda x, y, tt: naive_info_nce(x, y, tt)  # noqa: E731
    else:
        loss_fn = lambda x, y, tt: tcm_kernels.info_nce(x, y, temperature=tt, backend="triton")  # noqa: E731
    run(benchmark, _step(loss_fn, a, p, t), group=f"info_nce-gpu-fwd+bwd-B{b}-D{D}", provider=provider,
        baseline=provider == "naive", flops=_flops(b, provider), device="cuda", B=b, D=D, dtype="float32")
