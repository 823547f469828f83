"""masked_recon_loss: back ends vs the reference, vs MAE's own loss code, semantics, errors, opcheck, compile."""

from __future__ import annotations

import math

import pytest
import torch

import tcm_kernels
from tests.utils import assert_close_verbose, backend_param

OP = "recon_loss_forward"
BACKENDS = [backend_param(OP, "reference"), backend_param(OP, "cpu"), backend_param(OP, "triton")]
KERNEL_BACKENDS = BACKENDS[1:]
# per_patch is a mean of O(1) squares: fp32 differences are summation order; fp16/bf16 inputs are
# rounded identically for every back end and all math is fp32, so the low-precision rows differ only
# in summation order as well (the stored grad is rounded to the input dtype: that sets their tolerance).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-4)}
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-6, 1.6e-2)}
# (shape, patch): 2D square/non-square patches, one patch per image, patch 1x2, 3D; N and D not powers of 2
CASES = [((2, 3, 8, 12), 4), ((1, 1, 6, 10), (3, 5)), ((3, 2, 7, 7), 7), ((2, 3, 5, 6), (1, 2)),
         ((2, 1, 4, 6, 6), (2, 3, 3)), ((1, 2, 6, 4, 8), 2)]


def _inputs(shape, patch, dtype, *, seed=0, keep=0.4, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g).to(dtype)
    target = (torch.randn(shape, generator=g) * 3 + offset).to(dtype)
    ps = (patch,) * (len(shape) - 2) if isinstance(patch, int) else patch
    n = math.prod(s // p for s, p in zip(shape[2:], ps))
    visible = torch.rand(shape[0], n, generator=g) < keep
    visible[:, 0] = False  # at least one masked patch per row
    return pred, target, visible


def _run(backend, pred, target, visible, patch, **kw):
    p = pred.detach().clone().requires_grad_()
    loss, per_patch = tcm_kernels.masked_recon_loss(p, target, visible, patch, backend=backend, **kw)
    w = torch.linspace(0.5, 1.5, per_patch.numel()).reshape(per_patch.shape).to(per_patch.dtype)
    (gp,) = torch.autograd.grad(loss + (per_patch * w).sum(), p)  # both outputs carry gradient
    return loss, per_patch, gp


# interpreted Triton (~100x slower than the compiled kernels) sees the first and the 3D cases only
BACKEND_CASES = [pytest.param(b.values[0], shape, patch, marks=b.marks, id=f"{b.id}-{i}")
                 for b in KERNEL_BACKENDS for i, (shape, patch) in enumerate(CASES)
                 if b.id == "cpu" or i in (0, 4)]


@pytest.mark.parametrize("backend,shape,patch", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_reference(backend, dtype, shape, patch, norm_pix):
    pred, target, visible = _inputs(shape, patch, dtype)
    got = _run(backend, pred, target, visible, patch, norm_pix=norm_pix)
    want = _run("reference", pred, target, visible, patch, norm_pix=norm_pix)
    atol, rtol = TOL[dtype]
    assert got[0].dtype == want[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close_verbose(got[0], want[0], atol=atol, rtol=rtol, name="loss")
    assert_close_verbose(got[1], want[1], atol=atol, rtol=rtol, name="per_patch")
    assert got[2].dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    assert_close_verbose(got[2], want[2], atol=atol, rtol=rtol, name="grad pred")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,patch", [((1, 2, 4, 8), 4), ((1, 1, 2, 4, 4), 2)])
def test_gradcheck_fp64(backend, shape, patch):
    pred, target, visible = _inputs(shape, patch, torch.float64)
    pred = pred[:1].clone().requires_grad_()
    target, visible = target[:1], visible[:1]
    assert torch.autograd.gradcheck(
        lambda p: tcm_kernels.masked_recon_loss(p, target, visible, patch, backend=backend), (pred,),
        fast_mode=backend == "triton")  # interpreted Triton: the full Jacobian would take minutes


def _mae_forward_loss(imgs, pred_img, mask, p, norm_pix_loss=True):
    """MAE's models_mae.py: patchify (einsum) + forward_loss, verbatim up to variable names (mask 1 = remove)."""
    h = w = imgs.shape[2] // p

    def patchify(x):
        x = x.reshape(x.shape[0], x.shape[1], h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(x.shape[0], h * w, p ** 2 * x.shape[-1])

    target, pred = patchify(imgs), patchify(pred_img)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_mae_loss(backend):
    pred, target, visible = _inputs((3, 3, 32, 32), 8, torch.float64)
    want_loss, want_pp = _mae_forward_loss(target, pred, (~visible).double(), 8)
    loss, per_patch = tcm_kernels.masked_recon_loss(pred, target, visible, 8, backend=backend)
    assert_close_verbose(loss, want_loss, atol=1e-12, rtol=1e-12, name="loss")
    assert_close_verbose(per_patch, want_pp, atol=1e-12, rtol=1e-12, name="per_patch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_visible_gives_zero_loss_and_zero_grad(backend):
    pred, target, visible = _inputs((2, 3, 8, 8), 4, torch.float32)
    visible[:] = True
    p = pred.clone().requires_grad_()
    loss, per_patch = tcm_kernels.masked_recon_loss(p, target, visible, 4, backend=backend)
    assert loss.item() == 0.0 and torch.all(per_patch > 0)
    (g,) = torch.autograd.grad(loss, p)
    assert torch.all(g == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_patch_is_defined_everywhere_and_loss_averages_masked(backend):
    pred, target, visible = _inputs((2, 1, 8, 8), 4, torch.float64)
    loss, per_patch = tcm_kernels.masked_recon_loss(pred, target, visible, 4, backend=backend)
    # independent: normalize one patch by hand
    t = target[1, 0, 4:8, 0:4]
    t_hat = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
    assert abs(per_patch[1, 2].item() - ((pred[1, 0, 4:8, 0:4] - t_hat) ** 2).mean().item()) < 1e-12
    assert abs(loss.item() - per_patch[~visible].mean().item()) < 1e-12


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_mean_target_patches(backend):
    """Patches around 1e4 with unit spread: the variance must survive in fp32."""
    pred, target, visible = _inputs((2, 3, 8, 8), 4, torch.float32, offset=1e4)
    oracle = tcm_kernels.masked_recon_loss(pred.double(), target.double(), visible, 4, backend="reference")[1]
    got = tcm_kernels.masked_recon_loss(pred, target, visible, 4, backend=backend)[1]
    # fp32 inputs at 1e4 carry 1e-3 absolute rounding, 3e-4 of the std 3: the normalized error is of that order
    assert_close_verbose(got, oracle, atol=2e-3, rtol=2e-3, name="per_patch")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    """flash-attention rule: vs MAE's unfused loss computed in the same dtype."""
    pred, target, visible = _inputs((2, 3, 16, 16), 8, torch.float64)
    mask = (~visible).double()
    oracle = _mae_forward_loss(target, pred, mask, 8)
    theirs = _mae_forward_loss(target.to(dtype), pred.to(dtype), mask.to(dtype), 8)
    ours = tcm_kernels.masked_recon_loss(pred.to(dtype), target.to(dtype), visible, 8, backend=backend)
    for i, name in enumerate(("loss", "per_patch")):
        err_pt = (theirs[i].double() - oracle[i]).abs().max().item()
        err_ours = (ours[i].double() - oracle[i]).abs().max().item()
        assert err_ours <= 2 * err_pt, (name, err_ours, err_pt)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,err,match", [
    (dict(patch_size=5), ValueError, r"patch_size \(5, 5\) must divide the spatial shape \(8, 12\)"),
    (dict(patch_size=(4,)), ValueError, "patch_size must be a positive int or 2 positive ints"),
    (dict(visible=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"visible must be \[B, N\] = \[2, 6\]"),
    (dict(visible=torch.ones(2, 6)), TypeError, "visible must have dtype in"),
    (dict(target=torch.zeros(2, 3, 8, 8)), ValueError, "target must match pred"),
    (dict(target=torch.zeros(2, 3, 8, 12, dtype=torch.float64)), ValueError, "target must match pred"),
    (dict(eps=-1.0), ValueError, "eps must be in"),
])
def test_errors(kwargs, err, match):
    pred, target, visible = _inputs((2, 3, 8, 12), 4, torch.float32)
    args = dict(pred=pred, target=target, visible=visible, patch_size=4) | kwargs
    with pytest.raises(err, match=match):
        tcm_kernels.masked_recon_loss(**args)


def test_norm_pix_needs_two_elements():
    pred, target, _ = _inputs((2, 1, 4, 4), 1, torch.float32)
    with pytest.raises(ValueError, match="norm_pix needs at least 2 elements per patch"):
        tcm_kernels.masked_recon_loss(pred, target, torch.ones(2, 16, dtype=torch.bool), 1)
    tcm_kernels.masked_recon_loss(pred, target, torch.ones(2, 16, dtype=torch.bool), 1, norm_pix=False)


def test_compiled_kernel_checks():
    if not tcm_kernels._backend.compiled_available(OP):
        pytest.skip("compiled kernels not built (tcm_kernels._C missing recon_loss_forward)")
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="recon_loss_forward: patch_size .* must divide"):
        torch.ops.tcm.recon_loss_forward(x, x, [4, 4], True, 1e-6)
    with pytest.raises(ValueError, match=r"recon_loss_backward: grad_per_patch must be \[B, N\]"):
        torch.ops.tcm.recon_loss_backward(torch.zeros(1, 4), x, x, [2, 2], True, 1e-6)


# ---------------------------------------------------------------------------------------------- opcheck, compile

def _op_samples():
    pred, target, _ = _inputs((2, 3, 8, 12), 4, torch.float32)
    return {"recon_loss_forward": (pred, target, [4, 4], True, 1e-6),
            "recon_loss_backward": (torch.randn(2, 6), pred, target, [4, 4], True, 1e-6)}


@pytest.mark.parametrize("name", ["recon_loss_forward", "recon_loss_backward"])
def test_opcheck_compiled(name):
    if not tcm_kernels._backend.compiled_available(name):
        pytest.skip(f"compiled kernels not built (tcm_kernels._C missing {name})")
    torch.library.opcheck(getattr(torch.ops.tcm, name), _op_samples()[name])


@pytest.mark.parametrize("name", ["recon_loss_forward", "recon_loss_backward"])
def test_opcheck_triton(name):
    pytest.importorskip("triton")

    torch.library.opcheck(getattr(torch.ops.tcm, f"{name}_triton"), _op_samples()[name],
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    pred, target, visible = _inputs((2, 3, 8, 12), 4, torch.float32)

    def step(p):
        loss, per_patch = tcm_kernels.masked_recon_loss(p, target, visible, 4)
        return loss + 0.1 * per_patch.mean()

    pe, pc = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    le, lc = step(pe), torch.compile(step, fullgraph=True)(pc)
    assert_close_verbose(lc, le, atol=1e-6, rtol=1e-6, name="loss")
    le.backward()
    lc.backward()
    assert_close_verbose(pc.grad, pe.grad, atol=1e-7, rtol=1e-6, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    pred = torch.randn(0, 3, 8, 8, requires_grad=True)
    loss, per_patch = tcm_kernels.masked_recon_loss(pred, pred.detach(), torch.zeros(0, 4, dtype=torch.bool), 4,
                                                    backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and per_patch.shape == (0, 4) and pred.grad.shape == pred.shape
