"""CORAL: second-order alignment of two feature sets (Deep CORAL, Sun & Saenko 2016; CORN).

    loss = ||C_s - C_t||_F^2 / (4 d^2),   C = (X - mean X)^T (X - mean X) / (n - 1)

The d x d covariances are two GEMMs, so this is plain PyTorch: fp32 accumulation
(fp64 for fp64 input) whatever the input dtype, gradients through autograd.
:class:`CovarianceQueue` keeps a fixed-capacity pool of (e.g. confident target)
features whose covariance is updated per mini-batch in O(n d^2), the dynamic
feature pool of CORN. ``coral_loss`` does not check for non-finite features (they
propagate to the loss); ``CovarianceQueue.push`` rejects them, because a NaN folded into the
running sums would poison the covariance forever, even after its row is evicted.
"""

from __future__ import annotations

import torch

from .._autocast import autocast_rule
from .._core.dtypes import accumulation_dtype
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference.coral import covariance

_OP = "coral_loss"


def _check_features(op: str, name: str, x: object) -> torch.Tensor:
    check_tensor(op, name, x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[0] < 2:
        raise ValueError(f"{op}: {name} must have at least 2 rows for a covariance, got shape {tuple(x.shape)}")
    return x


class CovarianceQueue(torch.nn.Module):
    """FIFO pool of the last ``capacity`` feature rows and their covariance, updated per push.

    Sums of the rows and of their outer products (shifted by the first batch's mean,
    which keeps the fp64 sums well conditioned) are updated for the rows that enter
    and the rows that are evicted, so :meth:`covariance` costs O(d^2), a push O(n d^2).
    The pool lives in buffers, so ``.to(device)`` and ``state_dict`` (checkpoints) work.

    Args:
        dim: feature size d.
        capacity: rows kept (>= 2); older rows are evicted first.
        dtype: storage dtype of the pooled rows (default fp32); sums are fp64.
    """

    def __init__(self, dim: int, capacity: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("capacity", capacity, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CovarianceQueue: {name} must be an int >= {low}, got {value!r}")
        self.dim, self.capacity = dim, capacity
        self.register_buffer("features", torch.zeros(capacity, dim, dtype=dtype, device=device))
        self.register_buffer("shift", torch.zeros(dim, dtype=torch.float64, device=device))
        self.register_buffer("row_sum", torch.zeros(dim, dtype=torch.float64, device=device))
        self.register_buffer("outer_sum", torch.zeros(dim, dim, dtype=torch.float64, device=device))
        self._count = 0  # valid rows
        self._head = 0  # next write position; the oldest row when full

    def __len__(self) -> int:
        return self._count

    def get_extra_state(self) -> dict:
        return {"count": self._count, "head": self._head}

    def set_extra_state(self, state: dict) -> None:
        self._count, self._head = int(state["count"]), int(state["head"])

    def _accumulate(self, rows: torch.Tensor, sign: float) -> None:
        centred = rows.to(torch.float64) - self.shift
        self.row_sum.add_(centred.sum(0), alpha=sign)
        self.outer_sum.addmm_(centred.T, centred, alpha=sign)

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append the rows of x [n, d] (detached), evicting the oldest beyond ``capacity``.

        Raises ValueError (naming how many rows) if any row is NaN/inf in the pool dtype;
        the pool is then left unchanged.
        """
        check_tensor("CovarianceQueue.push", "x", x, ndim=2, dtypes=FLOAT_DTYPES)
        if x.shape[1] != self.dim:
            raise ValueError(f"CovarianceQueue.push: x must be [n, {self.dim}], got shape {tuple(x.shape)}")
        x = x.detach().to(device=self.features.device, dtype=self.features.dtype)
        # Checked after the cast: a finite fp32 row can overflow an fp16/bf16 pool. This is a
        # host sync, accepted because a non-finite row would corrupt the running sums for good.
        bad = int((~torch.isfinite(x)).any(1).sum())
        if bad:
            raise ValueError(f"CovarianceQueue.push: x must be finite in the pool dtype {self.features.dtype}, "
                             f"got {bad} of {x.shape[0]} rows with NaN or inf; the pool is unchanged")
        x = x[-self.capacity:]
        n = x.shape[0]
        if n == 0:
            return
        if self._count == 0:
            self.shift.copy_(x.to(torch.float64).mean(0))
        slots = (self._head + torch.arange(n, device=x.device)) % self.capacity
        free = self.capacity - self._count  # the first `free` slots are empty, the rest hold the oldest rows
        if n > free:
            self._accumulate(self.features[slots[free:]], -1.0)
        self._accumulate(x, 1.0)
        self.features[slots] = x
        self._head = (self._head + n) % self.capacity
        self._count = min(self.capacity, self._count + n)

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance [d, d] of the pooled rows, in fp32 (fp64 for an fp64 pool)."""
        if self._count < 2:
            raise ValueError(f"CovarianceQueue.covariance: needs at least 2 pooled rows, got {self._count}")
        mean = self.row_sum / self._count
        cov = (self.outer_sum - self._count * torch.outer(mean, mean)) / (self._count - 1)
        return cov.to(accumulation_dtype(self.features.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}, rows={self._count}"


@autocast_rule("fp32")
def coral_loss(source: torch.Tensor, target: torch.Tensor | CovarianceQueue) -> torch.Tensor:
    """CORAL loss ||C_s - C_t||_F^2 / (4 d^2) between two feature sets.

    Args:
        source: [n_s, d] features (fp32/fp16/bf16/fp64), n_s >= 2.
        target: [n_t, d] features (n_t >= 2, may differ from n_s; same dtype and device), or a
            :class:`CovarianceQueue` of dim d whose pooled covariance is the (constant) target.

    Returns:
        0-dim loss in fp32 (fp64 for fp64 input); differentiable w.r.t. source and a tensor target.
    """
    _check_features(_OP, "source", source)
    d = source.shape[1]
    acc = accumulation_dtype(source.dtype)
    if isinstance(target, CovarianceQueue):
        if target.dim != d:
            raise ValueError(f"{_OP}: source and target must have the same feature size d, got {d} and {target.dim}")
        check_same_device(_OP, source=source, target=target.features)
        target_cov = target.covariance().to(acc)
    else:
        _check_features(_OP, "target", target)
        check_same_device(_OP, source=source, target=target)
        if target.shape[1] != d:
            raise ValueError(f"{_OP}: source and target must have the same feature size d, got {d} and "
                             f"{target.shape[1]}")
        if target.dtype != source.dtype:
            raise TypeError(f"{_OP}: source and target must have the same dtype, got {source.dtype} and "
                            f"{target.dtype}")
        target_cov = covariance(target.to(acc))
    return (covariance(source.to(acc)) - target_cov).pow(2).sum() / (4 * d * d)
