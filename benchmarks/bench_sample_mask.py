"""sample_mask vs what users do today, side by side, per strategy.

Baselines: MAE's rand + argsort + argsort + gather (uniform), torch.multinomial
without replacement (weighted), a per-sample Python loop over ROI/background
indices as in the released TCM code (stratified), and AnatoMask's argsort of the
scores plus a random permutation of the rest (hardest). Every provider returns the
same three tensors (bool mask, ids_keep, ids_restore) so the work compared is equal.
"""

from __future__ import annotations

import math

import pytest
import torch

import tcm_kernels
from benchmarks.common import run

SHAPES = [(64, 196), (64, 392), (64, 4096), (256, 196), (256, 392), (256, 4096)]
RATIO = {"uniform": 0.6, "weighted": 0.6, "stratified": 0.4, "hardest": 0.6}


def _indices_from_masked(masked: torch.Tensor, m: int):
    """(visible, ids_keep, ids_restore) from a bool [B, N] 'masked' map, MAE conventions."""
    b, n = masked.shape
    order = torch.argsort(masked.to(torch.int8), dim=1, stable=True)  # kept (0) first, ascending
    return ~masked, order[:, : n - m], torch.argsort(order, dim=1)


def mae_uniform(scores: torch.Tensor, ratio: float):
    b, n = scores.shape
    n_keep = n - math.floor(ratio * n + 0.5)
    noise = torch.rand(b, n, device=scores.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(b, n, device=scores.device)
    mask[:, :n_keep] = 0
    return torch.gather(mask, 1, ids_restore) == 0, ids_keep, ids_restore


def multinomial_weighted(scores: torch.Tensor, ratio: float):
    b, n = scores.shape
    m = math.floor(ratio * n + 0.5)
    picked = torch.multinomial(scores, m, replacement=False)
    masked = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(1, picked, True)
    return _indices_from_masked(masked, m)


def loop_stratified(scores: torch.Tensor, ratio: float, roi_threshold: float = 0.5, roi_mask_ratio: float = 0.7):
    b, n = scores.shape
    m = math.floor(ratio * n + 0.5)
    masked = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    for i in range(b):
        roi = torch.nonzero(scores[i] >= roi_threshold).flatten()
        bg = torch.nonzero(scores[i] < roi_threshold).flatten()
        m_roi = min(max(round(roi_mask_ratio * len(roi)), m - len(bg)), m, len(roi))
        masked[i, roi[torch.randperm(len(roi), device=scores.device)[:m_roi]]] = True
        masked[i, bg[torch.randperm(len(bg), device=scores.device)[: m - m_roi]]] = True
    return _indices_from_masked(masked, m)


def argsort_hardest(scores: torch.Tensor, ratio: float, hard_fraction: float = 0.5):
    b, n = scores.shape
    m = math.floor(ratio * n + 0.5)
    h = math.floor(hard_fraction * m + 0.5)
    by_score = torch.argsort(scores, dim=1, descending=True)
    rest = by_score[:, h:]
    rest = rest.gather(1, torch.argsort(torch.rand(rest.shape, device=scores.device), dim=1))
    masked = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    masked.scatter_(1, by_score[:, :h], True).scatter_(1, rest[:, : m - h], True)
    return _indices_from_masked(masked, m)


BASELINES = {"uniform": ("mae_argsort", mae_uniform), "weighted": ("torch_multinomial", multinomial_weighted),
             "stratified": ("per_sample_loop", loop_stratified), "hardest": ("anatomask_argsort", argsort_hardest)}


def _scores(b: int, n: int) -> torch.Tensor:
    s = torch.rand(b, n, generator=torch.Generator().manual_seed(0))
    return s


def _bytes(b: int, n: int, m: int) -> int:
    return b * n * 4 + b * n * (1 + 8) + b * (n - m) * 8  # scores in; visible, ids_restore, ids_keep out


def _bench(benchmark, strategy: str, b: int, n: int, provider: str, device: str) -> None:
    """Time ``provider`` ("baseline" or "tcm_<backend>") on one shape, after checking it masks exactly M per row."""
    scores, ratio = _scores(b, n).to(device), RATIO[strategy]
    m = math.floor(ratio * n + 0.5)
    if provider == "baseline":
        name, fn = BASELINES[strategy]
        call = lambda: fn(scores, ratio)  # noqa: E731
    else:
        name = provider
        call = lambda: tcm_kernels.sample_mask(scores, ratio, strategy=strategy, seed=1, roi_threshold=0.5,  # noqa: E731
                                               roi_mask_ratio=0.7, hard_fraction=0.5,
                                               backend=provider.removeprefix("tcm_"))
    out = call()
    assert (~out[0]).sum(1).eq(m).all(), f"{name} did not mask exactly {m} per row"
    prefix = "sample_mask-gpu" if device == "cuda" else "sample_mask"
    run(benchmark, call, group=f"{prefix}-{strategy}-B{b}-N{n}", provider=name, baseline=provider == "baseline",
        bytes_moved=_bytes(b, n, m), device=device, strategy=strategy, B=b, N=n)


@pytest.mark.parametrize("b,n", SHAPES, ids=[f"B{b}-N{n}" for b, n in SHAPES])
@pytest.mark.parametrize("strategy", list(BASELINES))
@pytest.mark.parametrize("provider", ["baseline", "tcm_cpu"])
def test_sample_mask(benchmark, strategy, b, n, provider):
    _bench(benchmark, strategy, b, n, provider, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("b,n", SHAPES, ids=[f"B{b}-N{n}" for b, n in SHAPES])
@pytest.mark.parametrize("strategy", list(BASELINES))
@pytest.mark.parametrize("provider", ["baseline", "tcm_triton", "tcm_cuda"])
def test_sample_mask_gpu(benchmark, strategy, b, n, provider):
    _bench(benchmark, strategy, b, n, provider, "cuda")
