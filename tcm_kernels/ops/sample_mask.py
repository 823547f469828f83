"""Fused saliency-weighted mask sampling for masked image modelling.

One call draws, for every row of a [B, N] score matrix, which of the N patches
are masked, with exactly M = round(mask_ratio * N) masked per row so batches stay
rectangular, and returns the MAE-style index tensors alongside the boolean mask.

RNG recipe (identical bits on the CPU, CUDA and Triton back ends)
-----------------------------------------------------------------
For row ``r`` and patch ``n``::

    w = Philox4x32-10(counter = (n, r, offset mod 2^32, offset >> 32),
                      key     = (seed mod 2^32, seed >> 32))         # 4 x uint32

Every strategy turns ``w`` (and the score) into a 64-bit key and masks the
patches with the smallest ``(key, n)``; ties therefore go to the lower index.

* ``uniform``: key = w[0]. Every M-subset is equally likely (MAE / SparK).
* ``weighted``: u = (2 (w[0] >> 9) + 1) 2^-24, E = -log(u) (an Exp(1) draw),
  f = log(E) - log(score) / temperature, key = ordered(f) << 32 | w[1];
  zero scores get f = +inf, so they are masked only when the positive ones run out.
  The M smallest E / score^(1/T) are successive sampling without replacement with
  probability proportional to score^(1/T) (Efraimidis & Spirakis, 2006). ``log``
  is computed from +, -, *, / only (see csrc/sample_mask/sample_mask.h) and
  1/temperature is rounded to float32 once, so all back ends agree bit for bit.
* ``stratified`` (TCM): ROI = score >= roi_threshold (in float32). Mask
  round(roi_mask_ratio * |ROI|) ROI patches and the rest of M among the
  background, uniformly within each stratum (key = w[0]); when a stratum is too
  small, the other takes the excess. The total is always M.
* ``hardest`` (AnatoMask): the H = round(hard_fraction * M) highest scores (ties:
  lower index), then M - H uniformly (key = w[0]) among the rest.

``round`` is round-half-up, computed in float64: ``floor(x + 0.5)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend
from .._autocast import autocast_rule
from .._checks import FLOAT_DTYPES, check_real, check_tensor
from .._core.sampling import TRITON_MAX_PATCHES
from ..reference import sample_mask as _ref

STRATEGIES = ("uniform", "weighted", "stratified", "hardest")
_OP = "sample_mask"


class MaskSample(NamedTuple):
    """Result of :func:`sample_mask`.

    visible: bool [B, N], True = kept (SparK convention).
    ids_keep: int64 [B, N - M], kept patch indices in ascending order.
    ids_restore: int64 [B, N]; ``torch.gather(torch.cat([kept, masked], 1), 1, ids_restore)``
        puts patches back in order when kept/masked are gathered in ascending index order.
    """

    visible: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @property
    def num_masked(self) -> int:
        return self.visible.shape[1] - self.ids_keep.shape[1]

    def grid(self, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """``visible`` as the patch grid: bool [B, 1, *shape] (prod(shape) == N)."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != self.visible.shape[1]:
            raise ValueError(f"MaskSample.grid: shape {shape} must have {self.visible.shape[1]} patches, "
                             f"got {math.prod(shape)}")
        return self.visible.reshape(self.visible.shape[0], 1, *shape)


@torch.library.register_fake("tcm::sample_mask")
def _sample_mask_fake(scores, num_masked, strategy, seed, offset, temperature, roi_threshold, roi_mask_ratio,
                      hard_fraction):
    b, n = scores.shape
    return (scores.new_empty((b, n), dtype=torch.bool), scores.new_empty((b, n - num_masked), dtype=torch.int64),
            scores.new_empty((b, n), dtype=torch.int64))


@torch.library.register_fake("tcm::philox4x32_10")
def _philox_fake(counters, seed):
    return torch.empty_like(counters)


@torch.library.custom_op("tcm::sample_mask_triton", mutates_args=())
def _sample_mask_triton(scores: torch.Tensor, num_masked: int, strategy: str, seed: int, offset: int,
                        temperature: float, roi_threshold: float, roi_mask_ratio: float,
                        hard_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton back end of ``tcm::sample_mask`` (same schema); triton is imported on first use."""
    from ..triton.sample_mask import sample_mask_triton

    return sample_mask_triton(scores, num_masked, strategy, seed, offset, temperature, roi_threshold, roi_mask_ratio,
                              hard_fraction)


_sample_mask_triton.register_fake(_sample_mask_fake)


# The schema of torch.ops.tcm.sample_mask takes ``int seed, int offset``, which torch.compile
# specializes: every new offset (one per training step) would recompile the graph. This Python
# custom op declares them SymInt (custom_op's schema for ``int``), so a compiled caller traces
# them as dynamic values, and calls the compiled kernel with concrete ints when the graph runs.
@torch.library.custom_op("tcm::sample_mask_dynamic_seed", mutates_args=())
def _sample_mask_dynamic_seed(scores: torch.Tensor, num_masked: int, strategy: str, seed: int, offset: int,
                              temperature: float, roi_threshold: float, roi_mask_ratio: float,
                              hard_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.tcm.sample_mask(scores, num_masked, strategy, seed, offset, temperature, roi_threshold,
                                     roi_mask_ratio, hard_fraction)


_sample_mask_dynamic_seed.register_fake(_sample_mask_fake)


def _num_masked(mask_ratio: float | torch.Tensor, b: int, n: int) -> int:
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.dim() != 1 or mask_ratio.shape[0] != b:
            raise ValueError(f"{_OP}: mask_ratio tensor must be 1-D [B] with B={b}, got shape {tuple(mask_ratio.shape)}")
        ratios = mask_ratio.detach().double().cpu().tolist()  # host values: M sets the output shape
        for r in ratios:
            check_real(_OP, "mask_ratio", r, low=0.0, high=1.0, high_open=True)
        counts = sorted({math.floor(r * n + 0.5) for r in ratios})
        if len(counts) > 1:
            raise ValueError(f"{_OP}: every row must mask the same number of patches (round(mask_ratio * N)), "
                             f"got counts {counts} for N={n}")
        return counts[0] if counts else 0
    ratio = check_real(_OP, "mask_ratio", mask_ratio, low=0.0, high=1.0, high_open=True)
    return math.floor(ratio * n + 0.5)


def _check_scores(scores: torch.Tensor) -> None:
    if torch.compiler.is_compiling() or scores.device.type == "meta":
        return  # data-dependent checks would sync and break the graph (meta: no data); eager mode runs them
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{_OP}: scores must be finite in float32 (no NaN or inf)")
    if scores.numel() and bool((scores < 0).any()):
        raise ValueError(f"{_OP}: scores must be >= 0, got min {scores.min().item()}")


def _check_int(name: str, value: object) -> int:
    # torch.compile turns an int argument that changes between calls into a SymInt; accepting it
    # keeps a new seed/offset from recompiling.
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{_OP}: {name} must be in [0, 2^63), got {value}")
    return value


def sample_mask(scores: torch.Tensor, mask_ratio: float | torch.Tensor, *, strategy: str = "weighted",
                seed: int | None = None, offset: int = 0, generator: torch.Generator | None = None,
                temperature: float = 1.0, roi_threshold: float = 0.5, roi_mask_ratio: float | None = None,
                hard_fraction: float = 0.0, backend: str | None = None) -> MaskSample:
    """Sample which patches to mask, exactly M = round(mask_ratio * N) per row.

    Args:
        scores: float [B, N] (fp32/fp16/bf16/fp64), >= 0 and finite once cast to float32 (the
            precision every back end computes in), one per patch (see :func:`patch_scores`).
            Ignored by ``uniform``.
        mask_ratio: float in [0, 1), or a [B] tensor whose rows give equal M.
        strategy: ``"uniform" | "weighted" | "stratified" | "hardest"`` (module docstring).
        seed, offset: Philox key and stream; the same pair gives the same mask on
            every back end. Use a new ``offset`` per step for independent masks.
            When ``seed`` is None, seed and offset are drawn from ``generator``
            (or the default CPU generator). Under ``torch.compile`` a new seed or
            offset does not recompile (after the one recompile that makes them dynamic).
        temperature: in [1e-4, 1e4]; ``weighted`` samples with probability ~ score^(1/temperature).
        roi_threshold, roi_mask_ratio: ``stratified`` ROI cut and ROI masking ratio.
        hard_fraction: ``hardest``: share of M taken from the highest scores.
        backend: force ``"reference" | "cpu" | "triton" | "cuda"``; default picks
            Triton on CUDA tensors (the CUDA kernel for N > 16384, longer than a Triton tile) and
            the compiled kernel on CPU tensors.

    Returns:
        :class:`MaskSample` ``(visible bool [B, N], ids_keep int64 [B, N-M], ids_restore int64 [B, N])``
        on the device of ``scores``.
    """
    check_tensor(_OP, "scores", scores, ndim=2, dtypes=FLOAT_DTYPES)
    if strategy not in STRATEGIES:
        raise ValueError(f"{_OP}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    b, n = scores.shape
    num_masked = _num_masked(mask_ratio, b, n)
    # Bounded so that 1/temperature and the scaled log-scores stay finite in fp32 on every back end.
    temperature = check_real(_OP, "temperature", temperature, low=1e-4, high=1e4)
    roi_threshold = check_real(_OP, "roi_threshold", roi_threshold)
    if strategy == "stratified":
        if roi_mask_ratio is None:
            raise ValueError(f"{_OP}: strategy='stratified' needs roi_mask_ratio (a float in [0, 1]), got None")
        roi_mask_ratio = check_real(_OP, "roi_mask_ratio", roi_mask_ratio, low=0.0, high=1.0)
    else:
        roi_mask_ratio = 0.0 if roi_mask_ratio is None else check_real(_OP, "roi_mask_ratio", roi_mask_ratio,
                                                                        low=0.0, high=1.0)
    hard_fraction = check_real(_OP, "hard_fraction", hard_fraction, low=0.0, high=1.0)
    if seed is None:
        draw = torch.randint(0, 2**62, (2,), generator=generator)
        seed, offset = int(draw[0]), int(draw[1])
    seed, offset = _check_int("seed", seed), _check_int("offset", offset)

    chosen = _backend.choose_backend(_OP, scores.device, backend, has_cuda_kernel=True,
                                     prefer_cuda_kernel=scores.shape[-1] > TRITON_MAX_PATCHES)
    s32 = scores.detach().to(torch.float32).contiguous()
    # Every back end computes on the float32 scores, so those are what is checked. The compiled
    # CPU kernel checks each row itself, just before reading it, with the same errors: the two
    # extra passes here took 0.11 ms of a 0.82 ms call at B=256, N=196 (2 threads, before the
    # kernel's own speed-ups made that share larger).
    if strategy != "uniform" and chosen != "cpu":
        _check_scores(s32)
    args = (num_masked, strategy, seed, offset, temperature, roi_threshold, roi_mask_ratio, hard_fraction)
    if chosen == "reference":
        out = tuple(t.to(scores.device) for t in _ref.sample_mask(s32, *args))
    elif chosen == "triton":
        out = torch.ops.tcm.sample_mask_triton(s32, *args)
    elif torch.compiler.is_compiling():
        out = _sample_mask_dynamic_seed(s32, *args)
    else:
        out = torch.ops.tcm.sample_mask(s32, *args)
    return MaskSample(*out)


@autocast_rule("fp32")
def patch_scores(saliency: torch.Tensor, patch_size: int | tuple[int, ...], *, reduce: str = "mean") -> torch.Tensor:
    """Pool a pixel/voxel saliency map to one score per patch.

    Args:
        saliency: float [B, 1, H, W] or [B, 1, D, H, W].
        patch_size: int or a tuple with one entry per spatial dim; must divide each spatial size.
        reduce: ``"mean"`` or ``"max"``.

    Returns:
        float [B, N] with N = prod(S_i / p_i), patches in row-major (z, y, x) order,
        the order :meth:`MaskSample.grid` reshapes back.
    """
    op = "patch_scores"
    check_tensor(op, "saliency", saliency, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    if saliency.shape[1] != 1:
        raise ValueError(f"{op}: saliency must have one channel [B, 1, *S], got shape {tuple(saliency.shape)}")
    spatial = tuple(saliency.shape[2:])
    ps = (patch_size,) * len(spatial) if isinstance(patch_size, int) else tuple(patch_size)
    if len(ps) != len(spatial) or any((not isinstance(p, int)) or p < 1 for p in ps):
        raise ValueError(f"{op}: patch_size must be a positive int or {len(spatial)} positive ints, got {patch_size}")
    if any(s % p for s, p in zip(spatial, ps)):
        raise ValueError(f"{op}: patch_size {ps} must divide the spatial shape {spatial}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"{op}: reduce must be 'mean' or 'max', got {reduce!r}")
    pool = {("mean", 2): torch.nn.functional.avg_pool2d, ("mean", 3): torch.nn.functional.avg_pool3d,
            ("max", 2): torch.nn.functional.max_pool2d, ("max", 3): torch.nn.functional.max_pool3d}
    pooled = pool[(reduce, len(spatial))](saliency, kernel_size=ps, stride=ps)
    return pooled.flatten(1)


def upsample_mask(visible_grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each patch of a bool mask ``factor`` times along every spatial dim.

    visible_grid: bool [B, 1, *g] (g of rank 2 or 3) -> bool [B, 1, *(g * factor)]:
    the mask at an encoder scale whose patch covers ``factor`` sites per dim.
    """
    op = "upsample_mask"
    check_tensor(op, "visible_grid", visible_grid, ndim=(4, 5), dtypes=(torch.bool,))
    if visible_grid.shape[1] != 1:
        raise ValueError(f"{op}: visible_grid must be [B, 1, *g], got shape {tuple(visible_grid.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{op}: factor must be a positive int, got {factor!r}")
    out = visible_grid
    for dim in range(2, visible_grid.dim()):
        out = out.repeat_interleave(factor, dim=dim)
    return out
