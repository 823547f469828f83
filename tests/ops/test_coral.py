"""tcm_kernels.coral_loss and CovarianceQueue against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tcm_kernels
from tcm_kernels import CovarianceQueue, coral_loss
from tests.utils import assert_close_verbose


def _numpy_coral(source: np.ndarray, target: np.ndarray) -> float:
    d = source.shape[1]
    diff = np.cov(source, rowvar=False) - np.cov(target, rowvar=False)  # centred, 1/(n-1)
    return float((diff ** 2).sum() / (4 * d * d))


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + shift


# fp32 accumulation of inputs rounded to the dtype; the numpy oracle sees the rounded inputs in fp64.
TOL = {torch.float32: (1e-7, 1e-4), torch.float16: (1e-7, 1e-3), torch.bfloat16: (1e-7, 1e-3),
       torch.float64: (1e-12, 1e-10)}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n_s, n_t, d", [(2, 2, 1), (17, 40, 5), (64, 9, 33)])
def test_matches_numpy(dtype, n_s, n_t, d):
    s, t = _features(n_s, d, 1).to(dtype), _features(n_t, d, 2, shift=3.0).to(dtype)
    got = coral_loss(s, t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _numpy_coral(s.double().numpy(), t.double().numpy())
    atol, rtol = TOL[dtype]
    assert_close_verbose(got, torch.tensor(want), atol=atol, rtol=rtol, name=f"coral {dtype}")


def test_reference_matches_numpy():
    from tcm_kernels.reference.coral import coral_loss as reference_coral

    s, t = _features(12, 4, 1), _features(20, 4, 2)
    want = _numpy_coral(s.numpy(), t.numpy())
    assert_close_verbose(reference_coral(s, t), torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-10,
                         name="reference")


def test_gradcheck_fp64():
    s = _features(7, 4, 3).requires_grad_()
    t = _features(5, 4, 4).requires_grad_()
    torch.autograd.gradcheck(coral_loss, (s, t))


def test_same_distribution_gives_zero_and_shift_is_ignored():
    s = _features(30, 6, 5)
    assert coral_loss(s, s + 10.0).item() == pytest.approx(0.0, abs=1e-12)


def test_queue_covariance_matches_last_capacity_rows_after_wrapping():
    q = CovarianceQueue(5, capacity=23, dtype=torch.float64)
    rows = []
    for step, n in enumerate([4, 9, 1, 16, 30, 7, 0, 12]):  # includes a batch larger than the capacity
        x = _features(n, 5, 10 + step, shift=100.0)
        q.push(x)
        rows.append(x)
        pooled = torch.cat(rows)[-23:]
        assert len(q) == pooled.shape[0]
        if len(q) >= 2:
            want = np.cov(pooled.numpy(), rowvar=False).reshape(5, 5)
            assert_close_verbose(q.covariance(), torch.from_numpy(want), atol=1e-9, rtol=1e-9, name=f"step {step}")


def test_queue_fp32_storage_and_loss_equals_tensor_target():
    q = CovarianceQueue(8, capacity=50)
    pool = _features(50, 8, 7).float()
    for chunk in pool.split(13):
        q.push(chunk)
    s = _features(20, 8, 8).float().requires_grad_()
    loss = coral_loss(s, q)
    assert loss.dtype == torch.float32
    assert_close_verbose(loss, coral_loss(s, pool), atol=1e-7, rtol=1e-4, name="queue target")
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_queue_state_dict_roundtrip():
    q = CovarianceQueue(3, capacity=10, dtype=torch.float64)
    q.push(_features(14, 3, 9))
    restored = CovarianceQueue(3, capacity=10, dtype=torch.float64)
    restored.load_state_dict(q.state_dict())
    assert len(restored) == 10
    nxt = _features(4, 3, 10)
    q.push(nxt)
    restored.push(nxt)
    assert torch.equal(q.covariance(), restored.covariance())


def test_non_finite_features_propagate():
    s = _features(6, 3, 1)
    s[2, 1] = float("nan")
    assert torch.isnan(coral_loss(s, _features(6, 3, 2)))


def test_queue_rejects_non_finite_rows_and_stays_usable():
    q = CovarianceQueue(3, capacity=6, dtype=torch.float64)
    good = _features(6, 3, 11)
    q.push(good)
    before = q.covariance().clone()
    bad = _features(5, 3, 12)
    bad[1, 0] = float("nan")
    bad[3, 2] = float("inf")
    bad[4, 1] = float("-inf")
    with pytest.raises(ValueError, match="got 3 of 5 rows with NaN or inf"):
        q.push(bad)
    assert len(q) == 6 and torch.equal(q.covariance(), before)
    nxt = _features(4, 3, 13)
    q.push(nxt)
    want = np.cov(torch.cat([good, nxt])[-6:].numpy(), rowvar=False)
    assert_close_verbose(q.covariance(), torch.from_numpy(want), atol=1e-9, rtol=1e-9, name="after rejection")


def test_queue_rejects_rows_that_overflow_the_pool_dtype():
    q = CovarianceQueue(2, capacity=4, dtype=torch.float16)
    with pytest.raises(ValueError, match="got 1 of 3 rows"):
        q.push(torch.tensor([[1.0, 2.0], [1e6, 0.0], [3.0, 4.0]]))  # 1e6 is inf in fp16
    assert len(q) == 0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: coral_loss(torch.randn(5, 3), torch.randn(5, 4)), ValueError, "same feature size d, got 3 and 4"),
    (lambda: coral_loss(torch.randn(1, 3), torch.randn(5, 3)), ValueError, "source must have at least 2 rows"),
    (lambda: coral_loss(torch.randn(5, 3), torch.randn(1, 3)), ValueError, "target must have at least 2 rows"),
    (lambda: coral_loss(torch.randn(5), torch.randn(5, 3)), ValueError, "source must be 2-D"),
    (lambda: coral_loss(torch.randn(5, 3), torch.randn(5, 3).double()), TypeError, "same dtype"),
    (lambda: coral_loss(torch.randn(5, 3), CovarianceQueue(4, 8)), ValueError, "same feature size d, got 3 and 4"),
    (lambda: coral_loss(torch.randn(5, 3), CovarianceQueue(3, 8)), ValueError, "needs at least 2 pooled rows, got 0"),
    (lambda: CovarianceQueue(3, 1), ValueError, "capacity must be an int >= 2"),
    (lambda: CovarianceQueue(3, 8).push(torch.randn(2, 4)), ValueError, r"x must be \[n, 3\]"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_public_names():
    assert tcm_kernels.coral_loss is coral_loss and tcm_kernels.CovarianceQueue is CovarianceQueue
