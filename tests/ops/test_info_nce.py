"""tcm_kernels.info_nce: every back end against the naive full-logits loss."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import tcm_kernels
from tcm_kernels.reference.info_nce import logsumexp_rows_cols, naive_info_nce
from tests.utils import assert_close_verbose, backend_param, max_err_vs_oracle

OP = "info_nce_lse"
BACKENDS = [backend_param(OP, "reference"), backend_param(OP, "cpu"), backend_param(OP, "triton")]
COMPILED = [backend_param(OP, "cpu"), backend_param(OP, "triton")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Against the fp32 naive loss on the same (already rounded) inputs. fp16/bf16 gradients are
# returned in the input dtype, so they carry its output rounding (half an ulp of ~0.5 sized
# entries: 2.4e-4 in fp16, 2e-3 in bf16); the Triton kernel also rounds dL/dS to the input
# dtype before its second dot (as flash-attention does), hence the factors of ~4 above that.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 2e-2)}
# (B, D, block_size): one tile, 4 x 4 tiles, 4 x 4 tiles with a 2-row last tile and D not a
# power of two, and the default block with B not a multiple of it (compiled CPU only: large for
# the Triton interpreter).
SHAPES = [(7, 16, None), (64, 16, 16), (50, 24, 16)]
CPU_DEFAULT_BLOCK_SHAPE = (600, 32, None)


def _features(b: int, d: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, generator=g) * scale
    return a.to(dtype), (a + torch.randn(b, d, generator=g) * scale).to(dtype)  # correlated pairs


def _loss_and_grads(fn, a, b, temperature):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    t = temperature.detach().clone().requires_grad_() if torch.is_tensor(temperature) else temperature
    loss = fn(a, b, t)
    wrt = (a, b, t) if torch.is_tensor(t) else (a, b)
    return loss, torch.autograd.grad(loss.sum(), wrt)


def _compare(backend, dtype, a, b, temperature, *, symmetric=True, reduction="mean", block_size=None, tol=None):
    atol, rtol = tol or TOL[dtype]
    loss, grads = _loss_and_grads(
        lambda x, y, t: tcm_kernels.info_nce(x, y, temperature=t, symmetric=symmetric, reduction=reduction,
                                             block_size=block_size, backend=backend), a, b, temperature)
    ref_loss, ref_grads = _loss_and_grads(
        lambda x, y, t: naive_info_nce(x.double(), y.double(), t, symmetric=symmetric, reduction=reduction),
        a, b, temperature)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_verbose(loss, ref_loss, atol=atol, rtol=rtol, name=f"{backend} loss")
    for name, g, r in zip(("grad_a", "grad_b"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close_verbose(g, r, atol=atol, rtol=rtol, name=f"{backend} {name}")
    if len(grads) == 3:
        # d loss / d t sums B^2 terms of both signs (softmax-weighted logits minus the positives):
        # fp32 cancellation leaves ~1e-4 relative error, as in the naive loss computed in fp32.
        assert_close_verbose(grads[2], ref_grads[2], atol=max(atol, 1e-4), rtol=max(rtol, 1e-3),
                             name=f"{backend} grad_t")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_and_grads_match_naive(backend, dtype, shape, symmetric):
    b_, d, block = shape
    a, b = _features(b_, d, dtype, seed=b_ + d)
    _compare(backend, dtype, a, b, torch.tensor(0.2), symmetric=symmetric, block_size=block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_default_block_not_a_multiple(dtype):
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built")
    b_, d, block = CPU_DEFAULT_BLOCK_SHAPE
    a, b = _features(b_, d, dtype, seed=3)
    _compare("cpu", dtype, F.normalize(a.float(), dim=1).to(dtype), F.normalize(b.float(), dim=1).to(dtype),
             torch.tensor(0.07))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.07, 1.0, 5.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float_temperatures_and_reductions(backend, temperature, reduction):
    a, b = _features(37, 16, torch.float32, seed=11)
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    _compare(backend, torch.float32, a, b, temperature, reduction=reduction, block_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logit_range_uses_per_row_offsets(backend):
    """Unnormalised features at a low temperature: logits spread over thousands, far beyond the
    60 a tile may share one exp offset for, so the kernels' per-row/per-column path runs."""
    a, b = _features(40, 16, torch.float32, seed=5, scale=4.0)
    spread = (a @ b.T / 0.05)
    assert (spread.max() - spread.min()) > 1000
    # Logits of ~1e3 carry fp32 rounding of ~1e-4 (abs); the loss is a difference of such values.
    _compare(backend, torch.float32, a, b, torch.tensor(0.05), block_size=16, tol=(2e-3, 1e-4))


@pytest.mark.parametrize("backend", COMPILED)
def test_mixed_tiles_shared_and_per_row_offsets(backend):
    """Rows with a huge norm next to ordinary rows: some tiles take the shared-offset path, some not."""
    a, b = _features(48, 16, torch.float32, seed=9)
    a[:5] *= 40.0
    _compare(backend, torch.float32, a, b, torch.tensor(0.5), block_size=16, tol=(2e-3, 1e-4))


def test_gradcheck_reference_fp64():
    a, b = (t.double().requires_grad_() for t in _features(5, 3, torch.float64, seed=1))
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    for symmetric in (True, False):
        torch.autograd.gradcheck(
            lambda x, y, tt: tcm_kernels.info_nce(x, y, temperature=tt, symmetric=symmetric, backend="reference"),
            (a, b, t))


@pytest.mark.parametrize("backend", [backend_param(OP, "cpu")])
def test_gradcheck_compiled_cpu_fp64(backend):
    a, b = (t.double().requires_grad_() for t in _features(9, 3, torch.float64, seed=2))
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    for symmetric in (True, False):
        torch.autograd.gradcheck(
            lambda x, y, tt: tcm_kernels.info_nce(x, y, temperature=tt, symmetric=symmetric, block_size=4,
                                                  reduction="none", backend=backend), (a, b, t))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_error_within_twice_pytorch(backend, dtype):
    """flash-attention rule: vs an fp64 oracle, our fp16/bf16 error <= 2x the naive loss run in that dtype."""
    a, b = _features(64, 32, torch.float64, seed=4)
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)

    def ours(x, y):
        return tcm_kernels.info_nce(x, y, temperature=0.1, block_size=16, backend=backend)

    def naive(x, y):
        return naive_info_nce(x, y, 0.1)

    # The oracle is the naive loss in fp64 (the Triton kernels take no fp64 input).
    our_err = (ours(a.to(dtype), b.to(dtype)).double() - naive(a, b)).abs().item()
    torch_err = max_err_vs_oracle(naive, (a, b), dtype)
    assert our_err <= 2 * torch_err, (our_err, torch_err)
    # the same rule on the gradients (on the Triton back end: the dL/dS rounding of the GPU path)
    _, oracle = _loss_and_grads(lambda x, y, t: naive(x, y), a, b, None)
    _, mine = _loss_and_grads(lambda x, y, t: ours(x, y), a.to(dtype), b.to(dtype), None)
    _, theirs = _loss_and_grads(lambda x, y, t: naive(x, y), a.to(dtype), b.to(dtype), None)
    for name, m, t, o in zip(("a", "b"), mine, theirs, oracle):
        our_err, torch_err = ((g.double() - o).abs().max().item() for g in (m, t))
        assert our_err <= 2 * torch_err, (name, our_err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["a", "b"])
def test_non_finite_inputs_propagate(backend, bad, where):
    """Documented choice: no host-side finiteness check; a non-finite entry makes its pair's loss non-finite."""
    a, b = _features(20, 8, torch.float32, seed=6)
    (a if where == "a" else b)[3, 2] = bad
    per_pair = tcm_kernels.info_nce(a, b, temperature=0.5, reduction="none", block_size=16, backend=backend)
    assert not torch.isfinite(per_pair[3])
    assert not torch.isfinite(per_pair.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_flag(backend):
    a, b = _features(21, 16, torch.float32, seed=7, scale=3.0)
    got = tcm_kernels.info_nce(a, b, temperature=0.1, normalize=True, block_size=16, backend=backend)
    assert_close_verbose(got, naive_info_nce(F.normalize(a, dim=1), F.normalize(b, dim=1), 0.1), atol=1e-5,
                         rtol=1e-5, name="normalize")


def test_default_backend_on_cpu_is_compiled_kernel():
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built")
    a, b = _features(8, 4, torch.float32, seed=0)
    inv_t = torch.tensor(2.0)
    row, col = torch.ops.tcm.info_nce_lse(a, b, inv_t, True, 3)
    ref_row, ref_col = logsumexp_rows_cols(a, b, inv_t, True)
    assert_close_verbose(row, ref_row, atol=1e-5, rtol=1e-5, name="row_lse")
    assert_close_verbose(col, ref_col, atol=1e-5, rtol=1e-5, name="col_lse")


# ---- opcheck and torch.compile -------------------------------------------------------------------

@pytest.mark.parametrize("with_col", [True, False])
def test_opcheck_compiled_ops(with_col):
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built")
    a, b = _features(19, 8, torch.float32, seed=1)
    a.requires_grad_()
    b.requires_grad_()
    inv_t = torch.tensor(3.0, requires_grad=True)
    torch.library.opcheck(torch.ops.tcm.info_nce_lse, (a, b, inv_t, with_col, 8))
    row, col = torch.ops.tcm.info_nce_lse(a.detach(), b.detach(), inv_t.detach(), with_col, 8)
    g_row = torch.rand_like(row)
    g_col = torch.rand_like(col)
    torch.library.opcheck(torch.ops.tcm.info_nce_lse_backward,
                          (a.detach(), b.detach(), inv_t.detach(), row, col, g_row, g_col, 8))


def test_opcheck_triton_ops():
    pytest.importorskip("triton")
    op, backward_op = torch.ops.tcm.info_nce_lse_triton.default, torch.ops.tcm.info_nce_lse_backward_triton.default
    a, b = _features(19, 8, torch.float32, seed=1)
    inv_t = torch.tensor(3.0)
    torch.library.opcheck(op, (a.requires_grad_(), b.requires_grad_(), inv_t.requires_grad_(), True, 16))
    row, col = op(a.detach(), b.detach(), inv_t.detach(), True, 16)
    torch.library.opcheck(backward_op, (a.detach(), b.detach(), inv_t.detach(), row, col, torch.rand_like(row),
                                        torch.rand_like(col), 16))


@pytest.mark.parametrize("backend", COMPILED)
def test_torch_compile_fullgraph_matches_eager(backend):
    # aot_eager traces through dynamo and AOTAutograd (fake impls, autograd registration) without
    # inductor's C++ compile, which would take minutes on the 2-core CI machine.
    def loss_fn(x, y, t):
        return tcm_kernels.info_nce(x, y, temperature=t, block_size=16, backend=backend)

    a, b = _features(33, 16, torch.float32, seed=2)
    t = torch.tensor(0.3)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(compiled, a, b, t)
    want, want_grads = _loss_and_grads(loss_fn, a, b, t)
    assert_close_verbose(got, want, atol=1e-6, rtol=1e-6, name="compiled loss")
    for g, w in zip(got_grads, want_grads):
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-6, name="compiled grad")


# ---- errors ------------------------------------------------------------------------------------

def _ab(b=4, d=3):
    return torch.randn(b, d), torch.randn(b, d)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: tcm_kernels.info_nce(torch.randn(4, 3), torch.randn(5, 3), temperature=0.1), ValueError,
     "same batch size B, got 4 and 5"),
    (lambda: tcm_kernels.info_nce(torch.randn(4, 3), torch.randn(4, 2), temperature=0.1), ValueError,
     "same feature size D, got 3 and 2"),
    (lambda: tcm_kernels.info_nce(torch.randn(1, 3), torch.randn(1, 3), temperature=0.1), ValueError,
     "B must be >= 2"),
    (lambda: tcm_kernels.info_nce(torch.randn(4), torch.randn(4), temperature=0.1), ValueError, "must be 2-D"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=0.0), ValueError, r"temperature must be in \(0"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=-1.0), ValueError, r"temperature must be in \(0"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=torch.tensor(-0.5)), ValueError,
     r"temperature must be in \(0, inf\), got -0.5"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=torch.tensor([0.1, 0.2])), ValueError,
     "temperature must be a float or a floating-point tensor with one element"),
    (lambda: tcm_kernels.info_nce(torch.randn(4, 3), torch.randn(4, 3).double(), temperature=0.1), TypeError,
     "same dtype"),
    (lambda: tcm_kernels.info_nce(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64),
                                  temperature=0.1), TypeError, "a must have dtype in"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=0.1, reduction="max"), ValueError, "reduction must be one of"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=0.1, block_size=0), ValueError, "block_size must be"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=0.1, gather=True), RuntimeError, "process group"),
    (lambda: tcm_kernels.info_nce(*_ab(), temperature=0.1, backend="gpu"), ValueError, "backend must be one of"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_triton_block_size_must_be_power_of_two():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"power of two in \[16, 128\] on the Triton back end, got 24"):
        tcm_kernels.info_nce(*_ab(), temperature=0.1, block_size=24, backend="triton")


def test_compiled_op_checks_its_arguments():
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built")
    with pytest.raises(ValueError, match="info_nce_lse: x and y must have the same feature size D, got 3 and 2"):
        torch.ops.tcm.info_nce_lse(torch.randn(4, 3), torch.randn(4, 2), torch.tensor(1.0), True, 8)
    with pytest.raises(ValueError, match="inv_t must be finite and > 0"):
        torch.ops.tcm.info_nce_lse(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-1.0), True, 8)


# ---- Triton: the launch configurations compile for sm_80 and sm_90 and fit their limits -----------

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SWEEP_D = [16, 64, 128, 256, 512, 1024, 1025, 2048, 4096]
# Bytes of stack (register spills) per thread allowed in a default configuration: none. The audit
# found 6-24 KB for the previous whole-D tiles; every default choice now compiles without spills.
MAX_STACK = 0


def _sweep_jobs():
    """One compile job per distinct (target, dtype, direction, config) the launchers choose for SWEEP_D."""
    from tcm_kernels.triton import info_nce as k
    from tests.triton_compile import SHARED_LIMIT

    jobs, estimates = {}, {}
    for cap, limit in SHARED_LIMIT.items():
        for dtype, ty in _TRITON_TYPE.items():
            for backward in (False, True):
                for d in SWEEP_D:
                    cfg = k.choose_config(d, dtype, limit, backward)
                    name = f"sm{cap}-{ty}-{'bwd' if backward else 'fwd'}-{'-'.join(map(str, cfg))}"
                    sig = {"X": f"*{ty}", "Y": f"*{ty}", "INV_T": "*fp32", "M": "i32", "N": "i32", "D": "i32",
                           "stride_x": "i32", "stride_y": "i32"}
                    consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                              "EMULATE_BF16": False}
                    if backward:  # every term on: the largest variant of the kernel
                        sig.update({"LSE_X": "*fp32", "G_X": "*fp32", "LSE_Y": "*fp32", "G_Y": "*fp32",
                                    "GRAD_X": f"*{ty}", "DOT": "*fp32", "stride_g": "i32"})
                        consts.update(X_TERM=True, Y_TERM=True, WRITE_DOT=True, BLOCK_O=cfg.block_o)
                    else:
                        sig["LSE"] = "*fp32"
                    kernel = "_grad_kernel" if backward else "_row_lse_kernel"
                    jobs[name] = {"name": name, "kernel": f"tcm_kernels.triton.info_nce:{kernel}", "signature": sig,
                                  "constexprs": consts, "cap": cap,
                                  "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}
                    estimates[name] = (cap, k.shared_memory_estimate(cfg, dtype.itemsize, backward))
    return list(jobs.values()), estimates


@pytest.fixture(scope="module")
def compile_sweep():
    pytest.importorskip("triton")
    from tests.triton_compile import compile_kernels

    jobs, estimates = _sweep_jobs()
    return compile_kernels(jobs), estimates


def test_triton_configs_fit_shared_memory_and_do_not_spill(compile_sweep):
    """Every configuration chosen for D in SWEEP_D, each dtype, sm_80 and sm_90: shared memory within the
    target's limit and within the launcher's estimate (from which it picks the stages), no spills."""
    from tests.triton_compile import SHARED_LIMIT, arch

    report, estimates = compile_sweep
    assert set(report) == set(estimates)
    assert len(report) >= 2 * 3 * 2  # both targets, every dtype, both directions
    for name, entry in report.items():
        cap, estimate = estimates[name]
        assert entry["target"] == arch(cap) and entry["entry"] and entry["cubin_bytes"] > 0, (name, entry)
        assert entry["shared"] <= SHARED_LIMIT[cap], (name, entry["shared"])
        assert entry["shared"] <= estimate, (name, entry["shared"], estimate)
        assert entry["stack"] <= MAX_STACK, (name, entry["regs"], entry["stack"])


def test_triton_config_follows_the_device_limit():
    pytest.importorskip("triton")
    from tcm_kernels.triton.info_nce import choose_config, shared_memory_estimate

    # H100, A100, sm_86, sm_75, the default without opt-in: the default tiles fit all of them
    for limit in (232448, 166912, 101376, 65536, 49152):
        for dtype in DTYPES:
            for backward in (False, True):
                for block in (0, 128) if limit >= 101376 else (0,):
                    cfg = choose_config(4096, dtype, limit, backward, block)
                    assert shared_memory_estimate(cfg, dtype.itemsize, backward) <= limit, (limit, cfg)
    # registers and shared memory do not grow with D: the same tiles from D = 128 on
    assert choose_config(128, torch.float32, 166912, True) == choose_config(65536, torch.float32, 166912, True)
    assert choose_config(4096, torch.bfloat16, 166912, True).num_stages == 3
    big = choose_config(4096, torch.float32, 101376, True, 128)
    assert (big.num_stages, big.block_o) < (3, 128), big  # fewer stages or narrower column blocks
    with pytest.raises(ValueError, match="block_size 128 needs .* B of shared memory, this device has 49152 B"):
        choose_config(64, torch.float32, 49152, True, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_low_precision_path_rounds_dlds_like_the_gpu(dtype):
    """The interpreter runs the GPU's fp16/bf16 path: dots on the inputs' values, dL/dS rounded to nearest
    in the input dtype before the second dot, the gradient rounded to nearest on output. One 16-row tile,
    so the kernel's sums are a plain fp32 GEMM here too: (nearly) every element equals that emulation,
    far fewer equal the emulation without the dL/dS rounding."""
    pytest.importorskip("triton")
    from tcm_kernels.triton.info_nce import info_nce_lse_backward_triton, info_nce_lse_triton

    a, b = _features(16, 32, dtype, seed=11)
    inv_t = torch.tensor(2.0)
    row, col = info_nce_lse_triton(a, b, inv_t, True, 16)
    g_row, g_col = torch.rand(16, generator=torch.Generator().manual_seed(0)), torch.zeros(16)
    grad_a, _, _ = info_nce_lse_backward_triton(a, b, inv_t, row, col, g_row, g_col, 16)
    dlds = g_row[:, None] * torch.exp((a.float() @ b.float().T) * 2.0 - row[:, None])
    rounded = ((dlds.to(dtype).float() @ b.float()) * 2.0).to(dtype)
    unrounded = ((dlds @ b.float()) * 2.0).to(dtype)
    same = (grad_a == rounded).float().mean().item()
    assert same >= 0.99, same  # a last-bit tie may fall the other way after a different fp32 sum order
    assert (grad_a == unrounded).float().mean().item() < 0.9


def test_triton_d_larger_than_one_column_block_matches_naive():
    """D = 300 > BLOCK_O = 128: three column blocks of the gradient, each recomputing S over D in chunks."""
    pytest.importorskip("triton")
    a, b = _features(20, 300, torch.float32, seed=3)
    _compare("triton", torch.float32, a, b, torch.tensor(0.7), block_size=16)
