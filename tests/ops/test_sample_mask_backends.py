"""sample_mask on the Triton and CUDA back ends: bit-identical to the reference.

Here (no GPU) the Triton kernel runs through TRITON_INTERPRET=1 on CPU tensors and is
compiled to PTX for sm_80 / sm_90 in a subprocess; the CUDA kernel is only compiled
(CMake). The `gpu` tests repeat the comparisons on a real device, larger shapes included.
The reference / CPU back ends are covered by tests/ops/test_sample_mask.py.
"""

from __future__ import annotations


import pytest
import torch

import tcm_kernels
from tcm_kernels.reference import philox as ref_philox
from tests.ops.test_sample_mask import KAT  # Random123 known-answer vectors of Philox-4x32-10
from tests.utils import backend_param

triton = pytest.importorskip("triton", reason="triton not installed")
import triton.language as tl  # noqa: E402

from tcm_kernels.triton import sample_mask as tsm  # noqa: E402
from tcm_kernels.triton.philox import philox4x32_10_triton  # noqa: E402

OP = "sample_mask"
STRATEGIES = ("uniform", "weighted", "stratified", "hardest")
SEED, OFFSET = 0x1234_5678_9ABC, 2**33 + 5  # both words of key and offset in play
# Strategy parameters that exercise each rule: a temperature != 1, a ROI share that
# spills on some rows, a hard fraction whose budget rounds half up.
KWARGS = {"uniform": {}, "weighted": {"temperature": 0.7},
          "stratified": {"roi_threshold": 0.5, "roi_mask_ratio": 0.75}, "hardest": {"hard_fraction": 0.5}}


def _scores(b: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """Scores with zeros, exact ties (multiples of 1/8) and a subnormal, the cases that decide keys."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 9, (b, n), generator=g).float() / 8
    if n > 2:
        s[:, 1] = 1e-40  # subnormal: the log's integer rescaling path
    return s


def _assert_same_mask(got, want, what: str) -> None:
    for name, g, w in zip(("visible", "ids_keep", "ids_restore"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} {name}: {g.dtype}{tuple(g.shape)} vs " \
                                                          f"{w.dtype}{tuple(w.shape)}"
        bad = (g.cpu() != w.cpu())
        assert not bad.any(), f"{what} {name}: {int(bad.sum())} entries differ, first at {bad.nonzero()[:3].tolist()}"


def _sample(backend: str, scores: torch.Tensor, ratio, strategy: str, **kwargs):
    return tcm_kernels.sample_mask(scores, ratio, strategy=strategy, seed=SEED, offset=OFFSET, backend=backend,
                                   **{**KWARGS[strategy], **kwargs})


# ---- Triton (interpreted here) == reference, bit for bit --------------------------------------

SHAPES = [  # (B, N, mask_ratio)
    (1, 1, 0.0),  # one patch, nothing masked
    (2, 7, 0.5),  # prime, fewer patches than a warp
    (2, 97, 0.6),  # prime
    (4, 196, 0.75),  # 14 x 14 ViT grid
    (1, 197, 0.4),  # prime, one past 196
    (1, 257, 0.6),  # one past a power of two: a 512-lane tile, half empty
    (1, 392, 0.9),  # 2 x 14 x 14
    (0, 50, 0.5),  # empty batch
    (2, 33, 0.0),  # M = 0
    (1, 4096, 0.6),  # 16^3 3D grid: 8 warps on a GPU
    (1, 16384, 0.4),  # MAX_PATCHES, the largest tile
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("b,n,ratio", SHAPES, ids=[f"{b}x{n}-r{r}" for b, n, r in SHAPES])
def test_triton_matches_reference(strategy, b, n, ratio, device):
    scores = _scores(b, n)
    want = _sample("reference", scores, ratio, strategy)
    got = _sample("triton", scores.to(device), ratio, strategy)
    _assert_same_mask(got, want, f"{strategy} {b}x{n}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", ["all_zero", "all_roi", "empty_roi", "row_ratio_tensor", "mask_all_but_one"])
def test_triton_matches_reference_edge_cases(strategy, case, device):
    b, n = 2, 37
    scores, ratio, extra = _scores(b, n, seed=1), 0.5, {}
    if case == "all_zero":
        scores = torch.zeros(b, n)  # weighted: every key is +inf, order by the low word only
    elif case == "all_roi":
        scores = 0.5 + _scores(b, n, seed=2) / 2  # every score >= roi_threshold
    elif case == "empty_roi":
        scores = _scores(b, n, seed=3) * 0.49  # no score >= roi_threshold
    elif case == "row_ratio_tensor":
        ratio = torch.tensor([0.5, 0.51])  # equal M = round(r * 37) = 19 on both rows
    elif case == "mask_all_but_one":
        ratio, extra = 36 / 37, ({"hard_fraction": 1.0} if strategy == "hardest" else {})
    want = _sample("reference", scores, ratio, strategy, **extra)
    got = _sample("triton", scores.to(device), ratio.to(device) if torch.is_tensor(ratio) else ratio, strategy,
                  **extra)
    _assert_same_mask(got, want, f"{strategy} {case}")


@pytest.mark.parametrize("backend", [backend_param(OP, "cpu"), backend_param(OP, "triton")])
def test_same_seed_same_mask_on_every_backend(backend, device):
    """One (seed, offset) gives one mask everywhere; a new offset gives another."""
    scores = _scores(3, 61, seed=4)
    dev = device if backend == "triton" else torch.device("cpu")
    for strategy in STRATEGIES:
        want = _sample("reference", scores, 0.5, strategy)
        _assert_same_mask(_sample(backend, scores.to(dev), 0.5, strategy), want, f"{backend} {strategy}")
    moved = tcm_kernels.sample_mask(scores.to(dev), 0.5, strategy="uniform", seed=SEED, offset=OFFSET + 1,
                                    backend=backend)
    assert not torch.equal(moved.visible.cpu(), _sample("reference", scores, 0.5, "uniform").visible)


def test_triton_rejects_rows_longer_than_one_tile(device):
    scores = torch.zeros(1, tsm.MAX_PATCHES + 1, device=device)
    with pytest.raises(ValueError, match=r"sample_mask: the Triton kernel holds a row in one tile, so N must be "
                                         r"<= 16384, got N=16385"):
        tcm_kernels.sample_mask(scores, 0.5, strategy="uniform", seed=0, backend="triton")


def test_default_backend_sends_long_cuda_rows_to_the_cuda_kernel(monkeypatch):
    """N > 16384 on a CUDA device: the CUDA kernel (no row limit), not the Triton kernel that would raise."""
    from tcm_kernels import _backend
    from tcm_kernels.ops.sample_mask import TRITON_MAX_PATCHES

    monkeypatch.setattr(_backend, "compiled_available", lambda op, device_type="cpu": True)
    cuda = torch.device("cuda")
    pick = [_backend.choose_backend("sample_mask", cuda, None, has_cuda_kernel=True,
                                    prefer_cuda_kernel=n > TRITON_MAX_PATCHES) for n in (16384, 16385)]
    assert pick == ["triton", "cuda"]
    assert TRITON_MAX_PATCHES == tsm.MAX_PATCHES


# ---- the RNG pieces, bit for bit --------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_triton_philox_known_answers(counter, key, expected, device):
    words = philox4x32_10_triton(torch.tensor([counter], device=device), key[0] | key[1] << 32)
    assert [hex(w) for w in words[0].tolist()] == [hex(w) for w in expected]


def test_triton_philox_matches_reference_on_random_counters(device):
    counters = torch.randint(0, 2**32, (300, 4), generator=torch.Generator().manual_seed(5))
    seed = 0xDEADBEEF_0BADF00D
    want = torch.stack(ref_philox.philox4x32_10(*counters.unbind(1), seed & 0xFFFFFFFF, seed >> 32), dim=1)
    assert torch.equal(philox4x32_10_triton(counters.to(device), seed).cpu(), want)


@triton.jit
def _weighted_key_probe(scores_ptr, w0_ptr, w1_ptr, log_ptr, key_hi_ptr, key_lo_ptr, n, inv_temperature,
                        BLOCK: tl.constexpr):
    """Exposes _log_portable and _weighted_key of the kernel lane by lane."""
    lane = tl.arange(0, BLOCK)
    live = lane < n
    s = tl.load(scores_ptr + lane, mask=live, other=1.0)
    w0 = tl.load(w0_ptr + lane, mask=live, other=0).to(tl.uint32)
    w1 = tl.load(w1_ptr + lane, mask=live, other=0).to(tl.uint32)
    tl.store(log_ptr + lane, tsm._log_portable(tl.where(s > 0.0, s, 1.0)), mask=live)
    key = tsm._weighted_key(s, inv_temperature, w0, w1)
    tl.store(key_hi_ptr + lane, (key >> 32).to(tl.int64), mask=live)
    tl.store(key_lo_ptr + lane, (key & 0xFFFFFFFF).to(tl.int64), mask=live)


def test_triton_log_and_weighted_key_bits(device):
    """Every float class the log meets: subnormals, the sqrt(2) fold, powers of two, huge values."""
    special = torch.tensor([1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 0.70710677, 0.70710683, 1.0,
                            1.4142135, 1.4142137, 2.0, 3.0e38, 0.0], dtype=torch.float32)
    sweep = torch.arange(1, 0x7F800000, 0x7F800000 // 200, dtype=torch.int32).view(torch.float32)
    scores = torch.cat([special, sweep])
    n = scores.numel()
    g = torch.Generator().manual_seed(6)
    w0, w1 = torch.randint(0, 2**32, (2, n), generator=g)
    w0[:4] = torch.tensor([0, 0xFFFFFFFF, 0x1FF, 0x200])  # both ends of uniform_open
    inv_t = 1.0 / 0.7
    log_out = torch.empty(n, dtype=torch.float32, device=device)
    hi, lo = torch.empty(2, n, dtype=torch.int64, device=device)
    _weighted_key_probe[(1,)](scores.to(device), w0.to(device), w1.to(device), log_out, hi, lo, n,
                              torch.tensor(inv_t, dtype=torch.float32).item(),  # fp32(1/T), as the op rounds it
                              BLOCK=triton.next_power_of_2(n), enable_fp_fusion=False)
    positive = scores > 0
    want_log = ref_philox.log_portable(torch.where(positive, scores, 1.0))
    assert torch.equal(log_out.cpu().view(torch.int32), want_log.view(torch.int32))
    expo = -ref_philox.log_portable(ref_philox.uniform_open(w0))
    f = ref_philox.log_portable(expo) - want_log * torch.tensor(inv_t, dtype=torch.float32)
    want_hi = torch.where(positive, ref_philox.ordered_bits(f), 0xFFFFFFFF)
    assert torch.equal(hi.cpu(), want_hi)
    assert torch.equal(lo.cpu(), w1)


# ---- custom op, torch.compile ----------------------------------------------------------------

def test_triton_custom_op_opcheck(device):
    scores = _scores(2, 11, seed=7).to(device)
    torch.library.opcheck(torch.ops.tcm.sample_mask_triton.default, (scores, 5, "weighted", SEED, OFFSET, 1.0, 0.5, 0.0, 0.0))


def test_triton_torch_compile_fullgraph_matches_eager(device):
    def sample(scores):
        out = tcm_kernels.sample_mask(scores, 0.5, strategy="stratified", roi_mask_ratio=0.8, seed=SEED,
                                      offset=OFFSET, backend="triton")
        return out.visible, out.ids_keep, out.ids_restore

    scores = _scores(2, 13, seed=8).to(device)
    torch._dynamo.reset()
    _assert_same_mask(torch.compile(sample, fullgraph=True)(scores), sample(scores), "compiled")


# ---- PTX for sm_80 and sm_90, without a GPU ---------------------------------------------------

_SCALARS = ["n", "num_masked", "seed_lo", "seed_hi", "offset_lo", "offset_hi", "inv_temperature_bits",
            "roi_threshold_bits", "roi_mask_ratio_bits", "num_hard"]


@pytest.fixture(scope="module")
def ptx_report():
    """PTX of every strategy and of the Philox kernel for sm_80 and sm_90 (tests/triton_compile.py)."""
    pytest.importorskip("triton")
    import re

    from tcm_kernels.triton import sample_mask as tsm
    from tests.triton_compile import compile_kernels

    signature = {"scores_ptr": "*fp32", "visible_ptr": "*u8", "ids_keep_ptr": "*i64", "ids_restore_ptr": "*i64",
                 **{name: "i64" for name in _SCALARS}}
    jobs = []
    for cap in (80, 90):
        for strategy, sid in tsm.STRATEGY_IDS.items():
            jobs.append({"name": f"sm{cap}-{strategy}", "kernel": "tcm_kernels.triton.sample_mask:_sample_mask_kernel",
                         "signature": signature, "constexprs": {"STRATEGY": sid, "BLOCK": 256}, "cap": cap,
                         "options": {"num_warps": 4, "enable_fp_fusion": False}})
        jobs.append({"name": f"sm{cap}-philox", "kernel": "tcm_kernels.triton.philox:_philox_rows_kernel",
                     "signature": {"counters_ptr": "*i64", "words_ptr": "*i64", "num_counters": "i32",
                                   "seed_lo": "i64", "seed_hi": "i64"}, "constexprs": {"BLOCK": 128}, "cap": cap})
    report = compile_kernels(jobs, want_ptx=True)
    for entry in report.values():
        entry["f32_ops"] = sorted(set(re.findall(r"\b((?:mul|add|sub|fma|div)\.[a-z.]*f32)", entry.pop("ptx"))))
    return report


@pytest.mark.parametrize("cap", [80, 90])
def test_triton_kernel_compiles_to_ptx(ptx_report, cap):
    arch = "sm_80" if cap == 80 else "sm_90a"
    for strategy in STRATEGIES:
        entry = ptx_report[f"sm{cap}-{strategy}"]
        assert entry["target"] == arch and entry["entry"] and entry["cubin_bytes"] > 0, entry
        # Bit-identity on the GPU: IEEE round-to-nearest ops only (".rn" also forbids ptxas
        # from contracting mul+add into an FMA), and no approximate division.
        assert all(".rn." in op for op in entry["f32_ops"]), (strategy, entry["f32_ops"])
        assert not any(op.startswith("fma") for op in entry["f32_ops"]), (strategy, entry["f32_ops"])
    assert "div.rn.f32" in ptx_report[f"sm{cap}-weighted"]["f32_ops"]
    assert ptx_report[f"sm{cap}-philox"]["cubin_bytes"] > 0


# ---- real GPU: Triton and CUDA against the reference --------------------------------------------

GPU_SHAPES = [(1, 1, 0.0), (3, 97, 0.6), (64, 196, 0.75), (8, 257, 0.5), (4, 4096, 0.6), (2, 16384, 0.4)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [backend_param(OP, "triton"), backend_param(OP, "cuda")])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("b,n,ratio", GPU_SHAPES, ids=[f"{b}x{n}" for b, n, _ in GPU_SHAPES])
def test_gpu_backend_matches_reference(backend, strategy, b, n, ratio):
    scores = _scores(b, n, seed=9)
    want = _sample("cpu" if tcm_kernels._backend.compiled_available(OP) else "reference", scores, ratio, strategy)
    _assert_same_mask(_sample(backend, scores.cuda(), ratio, strategy), want, f"{backend} {strategy} {b}x{n}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [backend_param(OP, "cuda")])
def test_gpu_cuda_kernel_handles_rows_beyond_the_triton_tile(backend):
    scores = _scores(2, 20011, seed=10)  # prime, larger than MAX_PATCHES and than shared memory
    for strategy in STRATEGIES:
        want = _sample("cpu" if tcm_kernels._backend.compiled_available(OP) else "reference", scores, 0.5, strategy)
        _assert_same_mask(_sample(backend, scores.cuda(), 0.5, strategy), want, f"cuda {strategy} 2x20011")


@pytest.mark.gpu
@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_gpu_cuda_philox_known_answers(counter, key, expected):
    if not tcm_kernels._backend.compiled_available("philox4x32_10", "cuda"):
        pytest.skip("extension built without CUDA")
    seed = key[0] | key[1] << 32
    words = torch.ops.tcm.philox4x32_10(torch.tensor([counter], device="cuda"), seed - 2**64 * (seed >= 2**63))
    assert [hex(w) for w in words[0].tolist()] == [hex(w) for w in expected]
