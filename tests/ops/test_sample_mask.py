"""sample_mask: reference and compiled CPU back ends (Triton/CUDA: test_sample_mask_backends.py).

Exactness first (counts, index consistency, bit-equality between back ends, Philox
known-answer vectors, an independent NumPy re-derivation of the keys), then
statistics with fixed seeds (deterministic, so they cannot flake), then errors,
opcheck and torch.compile.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import tcm_kernels
from tcm_kernels.reference import philox as ref_philox
from tests.utils import backend_param

STRATEGIES = ("uniform", "weighted", "stratified", "hardest")
BACKENDS = [backend_param("sample_mask", "reference"), backend_param("sample_mask", "cpu")]
KW = dict(roi_mask_ratio=0.75, hard_fraction=0.5, roi_threshold=0.5)

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter, key, expected words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _scores(b: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, n, generator=g)
    s[:, ::5] = 0.0  # zero-score patches exercise the weighted fallback
    return s.to(dtype)


def _check_consistent(out: tcm_kernels.MaskSample, b: int, n: int, m: int) -> None:
    vis, keep, restore = out
    assert vis.shape == (b, n) and vis.dtype == torch.bool
    assert keep.shape == (b, n - m) and keep.dtype == torch.int64
    assert restore.shape == (b, n) and restore.dtype == torch.int64
    assert torch.equal((~vis).sum(1), torch.full((b,), m))
    ids = torch.arange(n).expand(b, n)
    assert torch.equal(keep, ids[vis].reshape(b, n - m))  # ascending kept indices
    masked = ids[~vis].reshape(b, m)
    values = torch.randn(b, n)
    shuffled = torch.cat([values.gather(1, keep), values.gather(1, masked)], dim=1)
    assert torch.equal(shuffled.gather(1, restore), values)  # MAE's restore convention


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("b,n,ratio", [(3, 1, 0.0), (3, 1, 0.6), (2, 7, 0.4), (5, 97, 0.6), (4, 196, 0.4),
                                       (1, 257, 0.75), (0, 13, 0.5), (2, 13, 0.0), (2, 392, 0.6)])
def test_counts_and_indices(backend, strategy, b, n, ratio):
    out = tcm_kernels.sample_mask(_scores(b, n), ratio, strategy=strategy, seed=11, offset=3, backend=backend, **KW)
    _check_consistent(out, b, n, math.floor(ratio * n + 0.5))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("b,n", [(4, 7), (6, 97), (3, 196), (2, 257), (2, 1031)])
@pytest.mark.parametrize("temperature", [1.0, 0.37])
def test_cpu_bit_identical_to_reference(strategy, dtype, b, n, temperature):
    if "cpu" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("compiled kernels not built (tcm_kernels._C missing sample_mask)")
    s = _scores(b, n, dtype, seed=n)
    kw = dict(strategy=strategy, seed=2**40 + 17, offset=2**33 + 5, temperature=temperature, **KW)
    ref = tcm_kernels.sample_mask(s, 0.6, backend="reference", **kw)
    cpu = tcm_kernels.sample_mask(s, 0.6, backend="cpu", **kw)
    for name, r, c in zip(ref._fields, ref, cpu):
        assert torch.equal(r, c), f"{name} differs for {strategy}, {dtype}, {(b, n)}"


def _structured_scores(kind: str, b: int, n: int) -> torch.Tensor:
    """Score rows that give the CPU selection sorted, reversed or heavily tied keys."""
    ramp = torch.arange(n, dtype=torch.float32) / n
    rows = {"constant": torch.full((n,), 0.5), "zeros": torch.zeros(n), "ascending": ramp, "descending": ramp.flip(0),
            "two_values": (torch.arange(n) % 2).float() * 0.7 + 0.1}[kind]
    return rows.expand(b, n).contiguous()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["constant", "zeros", "ascending", "descending", "two_values"])
@pytest.mark.parametrize("n,ratio", [(1031, 0.6), (4096, 0.25)])
def test_cpu_bit_identical_to_reference_on_structured_scores(strategy, kind, n, ratio):
    """Sorted, reversed and tied keys (hardest's score keys, zero-score weighted keys) select as the reference."""
    if "cpu" not in [p.values[0] for p in BACKENDS if not p.marks]:
        pytest.skip("compiled kernels not built (tcm_kernels._C missing sample_mask)")
    s = _structured_scores(kind, 2, n)
    kw = dict(strategy=strategy, seed=31, offset=7, **KW)
    ref = tcm_kernels.sample_mask(s, ratio, backend="reference", **kw)
    cpu = tcm_kernels.sample_mask(s, ratio, backend="cpu", **kw)
    for name, r, c in zip(ref._fields, ref, cpu):
        assert torch.equal(r, c), f"{name} differs for {strategy}, {kind}, n={n}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_other_offset_other_mask(backend):
    s = _scores(8, 196)
    a = tcm_kernels.sample_mask(s, 0.6, strategy="weighted", seed=5, offset=0, backend=backend)
    b = tcm_kernels.sample_mask(s, 0.6, strategy="weighted", seed=5, offset=0, backend=backend)
    c = tcm_kernels.sample_mask(s, 0.6, strategy="weighted", seed=5, offset=1, backend=backend)
    d = tcm_kernels.sample_mask(s, 0.6, strategy="weighted", seed=6, offset=0, backend=backend)
    assert torch.equal(a.visible, b.visible)
    assert not torch.equal(a.visible, c.visible) and not torch.equal(a.visible, d.visible)
    # rows of one call are independent streams too
    assert not torch.equal(a.visible[0], a.visible[1])


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    words = ref_philox.philox4x32_10(*[torch.tensor([c]) for c in ctr], *key)
    assert [int(w) for w in words] == list(expected)
    if tcm_kernels._backend.compiled_available("philox4x32_10"):
        seed = key[0] | (key[1] << 32)
        seed = seed - 2**64 if seed >= 2**63 else seed  # the schema's int is int64
        got = torch.ops.tcm.philox4x32_10(torch.tensor([ctr]), seed)
        assert got[0].tolist() == list(expected)


def _numpy_log(x: np.float32) -> np.float32:
    """The portable log re-derived in NumPy float32 scalars, straight from the recipe."""
    f = np.float32
    m, e = np.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    m, e = f(m * 2), int(e) - 1  # m in [1, 2)
    if m > f(math.sqrt(2)):
        m, e = f(m * f(0.5)), e + 1
    z = f(f(m - f(1)) / f(m + f(1)))
    w = f(z * z)
    p = f(1 / 11)
    for c in (1 / 9, 1 / 7, 1 / 5, 1 / 3, 1.0):
        p = f(f(p * w) + f(c))
    return f(f(f(e) * f(math.log(2))) + f(f(f(2) * z) * p))


def test_keys_match_independent_numpy_derivation():
    """Weighted keys of the reference equal a scalar NumPy re-derivation of the documented recipe."""
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(1e-6, 30, 200), [1e-40, 1.0, 1.5, 1.4142135, 1e30]]).astype(np.float32)
    ours = ref_philox.log_portable(torch.from_numpy(xs)).numpy()
    theirs = np.array([_numpy_log(x) for x in xs], dtype=np.float32)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    np.testing.assert_allclose(ours.astype(np.float64), np.log(xs.astype(np.float64)), rtol=3e-7, atol=3e-7)


def test_uniform_recipe_from_philox_words():
    """uniform masks exactly the M patches with the smallest first Philox word (ties: lower index)."""
    seed, offset, n, m = 123456789012, 77, 50, 20
    out = tcm_kernels.sample_mask(torch.zeros(3, n), m / n, strategy="uniform", seed=seed, offset=offset)
    for row in range(3):
        words = [int(w) for w in ref_philox.philox4x32_10(
            torch.arange(n), torch.tensor(row), torch.tensor(offset & 0xFFFFFFFF), torch.tensor(offset >> 32),
            seed & 0xFFFFFFFF, seed >> 32)[0]]
        expected = sorted(range(n), key=lambda i: (words[i], i))[:m]
        assert sorted(expected) == (~out.visible[row]).nonzero().flatten().tolist()


# ---------------------------------------------------------------- semantics and statistics

def _inclusion_probabilities(w: list[float], m: int) -> np.ndarray:
    """Exact inclusion probabilities of successive sampling without replacement, by enumeration."""
    p = np.zeros(len(w))
    for seq in itertools.permutations(range(len(w)), m):
        prob, left = 1.0, sum(w)
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        for i in seq:
            p[i] += prob
    return p


def _chi_square_ok(counts: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Chi-square statistic and the 99.99 % critical value (Wilson-Hilferty) for df = len - 1."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    z = 3.719  # one-sided 1e-4 normal quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


@pytest.mark.parametrize("backend", [backend_param("sample_mask", "cpu")])
def test_uniform_inclusion_is_flat(backend):
    b, n, m = 20000, 23, 9
    out = tcm_kernels.sample_mask(torch.rand(b, n), m / n, strategy="uniform", seed=1, backend=backend)
    counts = (~out.visible).sum(0).double().numpy()
    stat, crit = _chi_square_ok(counts, np.full(n, b * m / n))
    assert stat < crit, (stat, crit)


@pytest.mark.parametrize("backend", [backend_param("sample_mask", "cpu")])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_weighted_matches_successive_sampling(backend, temperature):
    scores = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    n, m, b = len(scores), 3, 60000
    out = tcm_kernels.sample_mask(torch.tensor(scores).expand(b, n).contiguous(), m / n, strategy="weighted",
                                  seed=2024, temperature=temperature, backend=backend)
    counts = (~out.visible).sum(0).double().numpy()
    expected = b * _inclusion_probabilities([s ** (1 / temperature) for s in scores], m)
    stat, crit = _chi_square_ok(counts, expected)
    assert stat < crit, (counts, expected, stat, crit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_zero_scores_only_when_positives_run_out(backend):
    s = torch.zeros(4, 20)
    s[:, [2, 5, 11]] = torch.tensor([0.3, 1.0, 0.01])
    out = tcm_kernels.sample_mask(s, 0.5, strategy="weighted", seed=9, backend=backend)
    assert (~out.visible[:, [2, 5, 11]]).all()  # all positives masked first
    zeros_masked = (~out.visible).sum(1) - 3
    assert torch.equal(zeros_masked, torch.full((4,), 7))
    # all-zero scores: uniform fallback, still exactly M, rows differ
    z = tcm_kernels.sample_mask(torch.zeros(4, 20), 0.5, strategy="weighted", seed=9, backend=backend)
    _check_consistent(z, 4, 20, 10)
    assert not torch.equal(z.visible[0], z.visible[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_roi,ratio,roi_ratio,expect_roi", [
    (20, 0.4, 0.75, 15),   # both strata fit: round(0.75 * 20) ROI, 25 background
    (90, 0.4, 0.1, 30),    # background (10) too small: ROI takes the excess
    (10, 0.4, 1.0, 10),    # ROI smaller than its share
    (0, 0.4, 0.9, 0),      # empty ROI
    (100, 0.4, 0.2, 40),   # all patches ROI
])
def test_stratified_counts_exact(backend, n_roi, ratio, roi_ratio, expect_roi):
    n, b = 100, 6
    s = torch.zeros(b, n)
    for row in range(b):
        s[row, torch.randperm(n, generator=torch.Generator().manual_seed(row))[:n_roi]] = 0.9
    out = tcm_kernels.sample_mask(s, ratio, strategy="stratified", seed=4, roi_threshold=0.5,
                                  roi_mask_ratio=roi_ratio, backend=backend)
    roi = s >= 0.5
    assert torch.equal(((~out.visible) & roi).sum(1), torch.full((b,), expect_roi))
    assert torch.equal((~out.visible).sum(1), torch.full((b,), 40))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hardest_takes_top_scores(backend):
    b, n = 5, 50
    s = torch.rand(b, n, generator=torch.Generator().manual_seed(3))
    s[:, 10] = s[:, 11] = 2.0  # a tie at the top: both are taken
    out = tcm_kernels.sample_mask(s, 0.4, strategy="hardest", hard_fraction=0.5, seed=1, backend=backend)
    top = s.topk(10, dim=1).indices  # H = 10 of M = 20
    assert (~out.visible.gather(1, top)).all()
    # hard_fraction=1: exactly the top-M; ties at the cut go to the lower index
    t = torch.ones(2, 10)
    t[:, 7] = 5.0
    full = tcm_kernels.sample_mask(t, 0.3, strategy="hardest", hard_fraction=1.0, seed=1, backend=backend)
    assert (~full.visible).nonzero()[:, 1].tolist() == [0, 1, 7, 0, 1, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_ratio_tensor(backend):
    s = _scores(3, 10)
    a = tcm_kernels.sample_mask(s, torch.tensor([0.4, 0.42, 0.38]), strategy="uniform", seed=1, backend=backend)
    b = tcm_kernels.sample_mask(s, 0.4, strategy="uniform", seed=1, backend=backend)
    assert torch.equal(a.visible, b.visible)
    with pytest.raises(ValueError, match="same number of patches"):
        tcm_kernels.sample_mask(s, torch.tensor([0.4, 0.5, 0.4]), seed=1, backend=backend)


def test_generator_convenience_is_reproducible():
    s = _scores(2, 30)
    a = tcm_kernels.sample_mask(s, 0.5, generator=torch.Generator().manual_seed(7))
    b = tcm_kernels.sample_mask(s, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.visible, b.visible)


def test_non_contiguous_scores():
    s = _scores(40, 9).t()  # [9, 40] view with strides (1, 9)
    a = tcm_kernels.sample_mask(s, 0.5, seed=3)
    b = tcm_kernels.sample_mask(s.contiguous(), 0.5, seed=3)
    assert torch.equal(a.visible, b.visible)


# ---------------------------------------------------------------- helpers

@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("shape,patch", [((2, 1, 8, 12), 4), ((1, 1, 6, 4, 8), (3, 2, 4))])
def test_patch_scores(reduce, shape, patch):
    sal = torch.rand(shape)
    got = tcm_kernels.patch_scores(sal, patch, reduce=reduce)
    ps = (patch,) * (len(shape) - 2) if isinstance(patch, int) else patch
    # explicit patchify: split each dim into (grid, patch), move patch dims last
    v = sal[:, 0]
    split = [v.shape[0]]
    for s, p in zip(v.shape[1:], ps):
        split += [s // p, p]
    v = v.reshape(split)
    d = len(ps)
    v = v.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2)).reshape(v.shape[0], -1, math.prod(ps))
    expected = v.mean(-1) if reduce == "mean" else v.amax(-1)
    torch.testing.assert_close(got, expected)


def test_grid_and_upsample_mask():
    out = tcm_kernels.sample_mask(torch.rand(2, 12), 0.5, seed=1)
    grid = out.grid((3, 4))
    assert grid.shape == (2, 1, 3, 4) and torch.equal(grid.flatten(1), out.visible)
    up = tcm_kernels.upsample_mask(grid, 4)
    assert up.shape == (2, 1, 12, 16)
    assert torch.equal(up[:, :, ::4, ::4], grid) and torch.equal(up[:, :, 3::4, 1::4], grid)
    g3 = torch.rand(1, 1, 2, 3, 2) > 0.5
    up3 = tcm_kernels.upsample_mask(g3, 2)
    assert torch.equal(up3, g3.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))
    with pytest.raises(ValueError, match="must have 12 patches"):
        out.grid((3, 5))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,exc,match", [
    (lambda s: tcm_kernels.sample_mask(s[0], 0.5, seed=1), ValueError, r"scores must be 2-D"),
    (lambda s: tcm_kernels.sample_mask(s.long(), 0.5, seed=1), TypeError, r"scores must have dtype"),
    (lambda s: tcm_kernels.sample_mask(-s, 0.5, seed=1), ValueError, r"scores must be >= 0"),
    (lambda s: tcm_kernels.sample_mask(s * float("nan"), 0.5, seed=1), ValueError, r"finite"),
    (lambda s: tcm_kernels.sample_mask(s, 1.0, seed=1), ValueError, r"mask_ratio must be in \[0.0, 1.0\)"),
    (lambda s: tcm_kernels.sample_mask(s, -0.1, seed=1), ValueError, r"mask_ratio must be in"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, strategy="random"), ValueError, r"strategy must be one of"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, strategy="stratified"), ValueError, r"needs roi_mask_ratio"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, strategy="stratified", roi_mask_ratio=1.5), ValueError,
     r"roi_mask_ratio must be in"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=-1), ValueError, r"seed must be in"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1.5), TypeError, r"seed must be an int"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, temperature=0.0), ValueError, r"temperature must be in"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, hard_fraction=2), ValueError, r"hard_fraction"),
    (lambda s: tcm_kernels.sample_mask(s, 0.5, seed=1, backend="gpu"), ValueError, r"backend must be one of"),
    (lambda s: tcm_kernels.sample_mask(s, torch.tensor([0.5]), seed=1), ValueError, r"mask_ratio tensor must be"),
    (lambda s: tcm_kernels.sample_mask([[0.5]], 0.5, seed=1), TypeError, r"scores must be a torch.Tensor"),
    (lambda s: tcm_kernels.patch_scores(s[:, None, :, None], 3), ValueError, r"must divide"),
    (lambda s: tcm_kernels.upsample_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 0), ValueError, r"factor"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.rand(4, 10))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("strategy", ["weighted", "stratified", "hardest"])
@pytest.mark.parametrize("bad,match", [(-0.25, r"scores must be >= 0, got min -0.25"), (float("nan"), "finite"),
                                       (float("inf"), "finite"), (float("-inf"), "finite")])
def test_invalid_scores_raise_on_every_backend(backend, dtype, strategy, bad, match):
    """The CPU kernel checks float32 scores itself (the wrapper skips its passes there): same errors as elsewhere."""
    s = torch.rand(1000, 40).to(dtype)  # 3 CPU tasks of 409 rows (grain ~16k patches): the bad row in the last
    s[-1, 17] = bad
    with pytest.raises(ValueError, match=match):
        tcm_kernels.sample_mask(s, 0.5, strategy=strategy, seed=1, backend=backend, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_scores_checked_as_float32(backend):
    """Scores are checked in float32, the precision every back end computes in."""
    s = torch.rand(2, 10, dtype=torch.float64)
    s[0, 3] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="finite in float32"):
        tcm_kernels.sample_mask(s, 0.5, strategy="weighted", seed=1, backend=backend)
    s[0, 3] = -1e-60  # -0.0 in float32: a zero score
    got = tcm_kernels.sample_mask(s, 0.5, strategy="weighted", seed=1, backend=backend)
    s[0, 3] = 0.0
    assert torch.equal(got.visible, tcm_kernels.sample_mask(s, 0.5, strategy="weighted", seed=1,
                                                            backend=backend).visible)


def test_compiled_op_rejects_bad_direct_calls():
    if not tcm_kernels._backend.compiled_available("sample_mask"):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing sample_mask)")
    with pytest.raises(ValueError, match="num_masked must be in"):
        torch.ops.tcm.sample_mask(torch.rand(2, 5), 6, "uniform", 0, 0, 1.0, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        torch.ops.tcm.sample_mask(torch.rand(2, 5), 2, "nope", 0, 0, 1.0, 0.5, 0.5, 0.0)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.tcm.sample_mask(torch.rand(2, 5).double(), 2, "uniform", 0, 0, 1.0, 0.5, 0.5, 0.0)
    bad = torch.rand(2, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        torch.ops.tcm.sample_mask(bad, 2, "weighted", 0, 0, 1.0, 0.5, 0.5, 0.0)
    bad[1, 2] = -1.0
    with pytest.raises(ValueError, match="scores must be >= 0"):
        torch.ops.tcm.sample_mask(bad, 2, "hardest", 0, 0, 1.0, 0.5, 0.5, 0.5)
    torch.ops.tcm.sample_mask(bad, 2, "uniform", 0, 0, 1.0, 0.5, 0.5, 0.0)  # uniform ignores the scores


# ---------------------------------------------------------------- registration

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_opcheck(strategy):
    if not tcm_kernels._backend.compiled_available("sample_mask"):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing sample_mask)")
    args = (torch.rand(3, 17), 7, strategy, 5, 2, 1.0, 0.5, 0.6, 0.5)
    torch.library.opcheck(torch.ops.tcm.sample_mask.default, args)
    torch.library.opcheck(torch.ops.tcm.philox4x32_10.default, (torch.randint(0, 2**32, (5, 4)), 3))


def test_torch_compile_fullgraph():
    def step(scores, x):
        out = tcm_kernels.sample_mask(scores, 0.6, strategy="weighted", seed=3, offset=1)
        kept = x.gather(1, out.ids_keep)
        return kept * 2, out.visible

    s, x = torch.rand(4, 49), torch.randn(4, 49)
    eager = step(s, x)
    compiled = torch.compile(step, fullgraph=True)(s, x)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@pytest.mark.parametrize("backend", [None, backend_param("sample_mask", "triton")])
def test_compiled_step_does_not_recompile_for_new_seed_or_offset(backend):
    """A training step gives sample_mask a new offset (and here a new seed) every call: after the
    warm-up (the first call, and the one recompile that makes the ints dynamic) 20 further steps
    reuse the graph and match eager exactly. aot_eager: the guards are dynamo's, and inductor's
    C++ compile would take minutes on the CI machine."""
    def step(scores, x, seed, offset):
        out = tcm_kernels.sample_mask(scores, 0.4, strategy="weighted", seed=seed, offset=offset, backend=backend)
        return x.gather(1, out.ids_keep) * 2, out.visible

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for warm in range(2):
        compiled(torch.rand(2, 16, generator=g), torch.randn(2, 16, generator=g), 7 + warm, warm)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step_index in range(2, 22):
        s, x = torch.rand(2, 16, generator=g), torch.randn(2, 16, generator=g)
        got, want = compiled(s, x, 7 + step_index, 3 * step_index), step(s, x, 7 + step_index, 3 * step_index)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"step {step_index}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a new seed/offset recompiled"
