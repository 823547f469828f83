"""Sparse batch norm and the masked reconstruction loss vs what SparK / MAE users run today.

Baselines, side by side with ours (forward + backward in every row):

* ``spark_gather``: SparK's SparseBatchNorm2d: ``x.permute(0, 2, 3, 1)[mask]``
  (a ``nonzero`` gather: host sync, data-dependent shape) -> nn.BatchNorm1d ->
  scatter into zeros -> permute back.
* ``tcm_gather_rows``: the masked-dense BN as gather -> the norm engine on rows -> scatter, the
  layout adapter ``sparse_batch_norm`` could have used instead of reading the masked-dense tensor
  in place (``tcm_cpu``).
* ``baseline`` of the compact groups: the compact [N, C] instance and batch norm as they were
  before the norm-statistics engine (per-sample sums by ``index_add``, 7 passes forward and 8
  backward; ``torch.batch_norm`` on the rows), kept here as :class:`IndexAddInstanceNorm`;
  ``torch_dense``: ``nn.functional.instance_norm`` / ``batch_norm`` on every site of the dense
  volume (what a dense encoder pays).
* ``mae_unfused``: MAE's loss: patchify target and pred (reshape/permute copies),
  normalize the target per patch (mean, unbiased var), squared error, mean per
  patch, mean over the masked patches.

Masks are patch-aligned and random, as in MIM: BN at SparK's stride-4 scale of a
224 image (56 x 56 sites, 8 x 8 sites per 32-pixel patch, 7 x 7 patches) with 60 % and
40 % of patches visible; the loss at patch 16 and 32 for 2D and 16 for 3D, 60 % masked.

Memory (``peak_mem_bytes``): the peak of bytes held by PyTorch's CPU allocator over
one forward + backward call, above what was allocated before it, read from the
profiler's allocation events (``profile_memory=True``: every alloc/free with its
size, summed in time order). It counts every tensor either provider allocates,
including the input gradient every implementation has to return; the loss rows
also record ``extra_mem_ratio`` = (peak - bytes of the pred gradient) / bytes of pred.
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from benchmarks.common import allocator_peak_bytes, run
from tcm_kernels.nn import SparseBatchNorm2d
from tcm_kernels.ops.sparse_norm_compact import compact_batch_norm, compact_instance_norm


def _visible_grid(b: int, grid: tuple[int, ...], keep: float, seed: int = 0) -> torch.Tensor:
    n = 1
    for g in grid:
        n *= g
    scores = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    return tcm_kernels.sample_mask(scores, 1.0 - keep, strategy="uniform", seed=seed).visible


def _patch_mask_2d(b: int, s: int, keep: float) -> torch.Tensor:
    """[B, 1, s, s] MIM mask of 7 x 7 random patches (8 x 8 sites when s is no multiple of 7)."""
    patch = s // 7 if s % 7 == 0 else 8
    vis = _visible_grid(b, (s // patch, s // patch), keep)
    return tcm_kernels.upsample_mask(vis.reshape(b, 1, s // patch, s // patch), patch)


# ------------------------------------------------------------------------------------------- sparse batch norm

class SparKBatchNorm2d(torch.nn.BatchNorm1d):
    """SparK's SparseBatchNorm2d (encoder.py), with the active map passed in."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ii = mask.squeeze(1).nonzero(as_tuple=True)
        bhwc = x.permute(0, 2, 3, 1)
        nc = super().forward(bhwc[ii])
        out = torch.zeros_like(bhwc)
        out[ii] = nc
        return out.permute(0, 3, 1, 2)


class GatherRowsBatchNorm2d(SparseBatchNorm2d):
    """The alternative masked-dense layout adapter of the norm engine: gather the active sites into
    rows (``nonzero``), the rows engine, scatter back (what ``sparse_batch_norm`` does not do)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ii = mask.squeeze(1).nonzero(as_tuple=True)
        bhwc = x.permute(0, 2, 3, 1)
        rows = compact_batch_norm(bhwc[ii], self.running_mean, self.running_var, self.weight, self.bias,
                                  momentum=self.momentum)
        out = torch.zeros_like(bhwc)
        out[ii] = rows
        return out.permute(0, 3, 1, 2)


BN_CASES = [(16, 256, 56, 0.4), (16, 256, 56, 0.6)]


@pytest.mark.parametrize("b,c,s,keep", BN_CASES,
                         ids=[f"B{b}-C{c}-{s}x{s}-vis{int(k * 100)}" for b, c, s, k in BN_CASES])
@pytest.mark.parametrize("provider", ["spark_gather", "tcm_cpu", "tcm_gather_rows"])
def test_sparse_batch_norm_fwd_bwd(benchmark, provider, b, c, s, keep):
    if benchmark.disabled:  # CI smoke run: same code path, small shape
        b, c, s = 2, 8, 16
    mask = _patch_mask_2d(b, s, keep)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(b, c, s, s, generator=g) * mask).requires_grad_()
    grad_out = torch.randn(b, c, s, s, generator=g) * mask
    layer = {"spark_gather": SparKBatchNorm2d, "tcm_cpu": SparseBatchNorm2d, "tcm_gather_rows": GatherRowsBatchNorm2d}[
        provider](c)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x, mask).backward(grad_out)

    # ours moves 8 tensors of x's size: read x (stats); read x, write y; read dy, x (sums); read dy, x, write dx.
    # Both providers' rate column uses this count.
    bytes_moved = 8 * x.numel() * 4
    run(benchmark, step, group=f"sparse_bn-fwd+bwd-B{b}-C{c}-{s}x{s}-vis{int(keep * 100)}", provider=provider,
        baseline=provider == "spark_gather", bytes_moved=bytes_moved, B=b, C=c, S=s, keep=keep, dtype="float32")


# ------------------------------------------------------------------------------------------- compact norms (3-D)

class IndexAddInstanceNorm(torch.autograd.Function):
    """The compact instance norm before the engine: features [N, C], per-sample sums by ``index_add``."""

    @staticmethod
    def forward(ctx, features, seg, batch_size, weight, bias, eps):
        rows = features.shape[0]
        count = features.new_zeros(batch_size, 1).index_add_(0, seg, features.new_ones(rows, 1)).clamp_min_(1)
        mean = features.new_zeros(batch_size, features.shape[1]).index_add_(0, seg, features) / count
        xc = (-mean).index_select(0, seg).add_(features)
        var = features.new_zeros(batch_size, features.shape[1]).index_add_(0, seg, xc * xc) / count
        rstd = torch.rsqrt(var + eps)
        y = (rstd * weight).index_select(0, seg).mul_(xc) + bias
        ctx.save_for_backward(xc, seg, weight, rstd, count)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, seg, weight, rstd, count = ctx.saved_tensors
        b = rstd.shape[0]
        sum_dy = dy.new_zeros(b, dy.shape[1]).index_add_(0, seg, dy)
        sum_dy_xc = dy.new_zeros(b, dy.shape[1]).index_add_(0, seg, dy * xc)
        x_scale = -rstd ** 3 * sum_dy_xc * weight / count
        shift = -rstd * sum_dy * weight / count
        dx = shift.index_select(0, seg).addcmul_(dy, (rstd * weight).index_select(0, seg))
        dx.addcmul_(xc, x_scale.index_select(0, seg))
        return dx, None, None, (sum_dy_xc * rstd).sum(0), sum_dy.sum(0), None


COMPACT_CASES = [("instance", 2, 32, 48, 0.4), ("batch", 2, 32, 48, 0.4)]


@pytest.mark.parametrize("kind,b,c,s,keep", COMPACT_CASES,
                         ids=[f"{k}-B{b}-C{c}-{s}cube-vis{int(v * 100)}" for k, b, c, s, v in COMPACT_CASES])
@pytest.mark.parametrize("provider", ["baseline", "torch_dense", "tcm_cpu"])
def test_compact_norm_3d_fwd_bwd(benchmark, provider, kind, b, c, s, keep):
    """A 3-D encoder's norm: rows of the visible sites of a 48^3 stage (patch 8: 6^3 patches)."""
    if benchmark.disabled:  # CI smoke run: same code path, small shape
        b, c, s = 2, 4, 16
    vis = _visible_grid(b, (s // 8,) * 3, keep)
    mask = tcm_kernels.upsample_mask(vis.reshape(b, 1, *(s // 8,) * 3), 8)
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(b, c, s, s, s, generator=g)
    st = tcm_kernels.SparseTensor.from_dense(dense, mask)
    seg = st.coords[:, 0].long()
    w, bias = (torch.rand(c, generator=g) + 0.5).requires_grad_(), torch.randn(c, generator=g).requires_grad_()
    if provider == "torch_dense":
        x = dense.clone().requires_grad_()
        fn = ((lambda: torch.nn.functional.instance_norm(x, weight=w, bias=bias)) if kind == "instance" else
              (lambda: torch.nn.functional.batch_norm(x, None, None, w, bias, True)))
    else:
        x = st.features.clone().requires_grad_()
        if provider == "tcm_cpu":
            fn = ((lambda: compact_instance_norm(x, seg, b, w, bias, backend="cpu")) if kind == "instance" else
                  (lambda: compact_batch_norm(x, None, None, w, bias, True, backend="cpu")))
        else:
            fn = ((lambda: IndexAddInstanceNorm.apply(x, seg, b, w, bias, 1e-5)) if kind == "instance" else
                  (lambda: torch.batch_norm(x, w, bias, None, None, True, 0.1, 1e-5, False)))
    grad_out = torch.randn(x.shape, generator=g)

    def step():
        x.grad = w.grad = bias.grad = None
        fn().backward(grad_out)

    if kind == "instance" and provider == "tcm_cpu":  # both compact providers compute the same norm
        want = IndexAddInstanceNorm.apply(x.detach(), seg, b, w.detach(), bias.detach(), 1e-5)
        torch.testing.assert_close(fn().detach(), want, rtol=1e-4, atol=1e-4)
    run(benchmark, step, group=f"compact_{kind}_norm-fwd+bwd-B{b}-C{c}-{s}cube-vis{int(keep * 100)}",
        provider=provider, baseline=provider == "baseline", bytes_moved=8 * x.numel() * 4, B=b, C=c, S=s,
        keep=keep, rows=st.features.shape[0], dtype="float32")


ROWS_BN_CASES = [(16, 256, 56, 0.4)]


@pytest.mark.parametrize("b,c,s,keep", ROWS_BN_CASES,
                         ids=[f"B{b}-C{c}-{s}x{s}-vis{int(k * 100)}" for b, c, s, k in ROWS_BN_CASES])
@pytest.mark.parametrize("provider", ["torch_batch_norm", "tcm_cpu"])
def test_compact_batch_norm_2d_fwd_bwd(benchmark, provider, b, c, s, keep):
    """A 2-D encoder's compact BN (ResNet-50 at stride 4): rows [N, C] of the visible sites, N =
    B * 56^2 * keep; ``torch_batch_norm`` on the same rows is what the engine replaced."""
    if benchmark.disabled:  # CI smoke run: same code path, small shape
        b, c, s = 2, 8, 16
    mask = _patch_mask_2d(b, s, keep)
    g = torch.Generator().manual_seed(4)
    rows = tcm_kernels.SparseTensor.from_dense(torch.randn(b, c, s, s, generator=g), mask).features
    x = rows.clone().requires_grad_()
    w, bias = (torch.rand(c, generator=g) + 0.5).requires_grad_(), torch.randn(c, generator=g).requires_grad_()
    fn = ((lambda: torch.batch_norm(x, w, bias, None, None, True, 0.1, 1e-5, False)) if provider == "torch_batch_norm"
          else (lambda: compact_batch_norm(x, None, None, w, bias, True, backend="cpu")))
    grad_out = torch.randn(x.shape, generator=g)

    def step():
        x.grad = w.grad = bias.grad = None
        fn().backward(grad_out)

    run(benchmark, step, group=f"compact_batch_norm_2d-fwd+bwd-B{b}-C{c}-{s}x{s}-vis{int(keep * 100)}",
        provider=provider, baseline=provider == "torch_batch_norm", bytes_moved=8 * x.numel() * 4, B=b, C=c, S=s,
        keep=keep, rows=x.shape[0], dtype="float32")


# ------------------------------------------------------------------------------------------- reconstruction loss

def _patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify generalised to 2D/3D: [B, C, *S] -> [B, N, prod(p) * C] (a copy)."""
    b, c = img.shape[:2]
    spatial = img.shape[2:]
    d = len(spatial)
    shape = [b, c]
    for s in spatial:
        shape += [s // p, p]
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return img.reshape(shape).permute(perm).reshape(b, -1, p ** d * c)


def mae_unfused_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, p: int):
    t = _patchify(target, p)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    t = (t - mean) / (var + 1e-6) ** 0.5
    per_patch = ((_patchify(pred, p) - t) ** 2).mean(dim=-1)
    mask = (~visible).float()
    return (per_patch * mask).sum() / mask.sum(), per_patch


LOSS_CASES = [((16, 3, 224, 224), 16), ((16, 3, 224, 224), 32), ((2, 1, 96, 96, 96), 16)]


@pytest.mark.parametrize("shape,p", LOSS_CASES, ids=["2d-p16", "2d-p32", "3d-p16"])
@pytest.mark.parametrize("provider", ["mae_unfused", "tcm_cpu"])
def test_recon_loss_fwd_bwd(benchmark, provider, shape, p):
    if benchmark.disabled:  # CI smoke run: same code path, small shape
        shape = (2, *shape[1:2], *(2 * p for _ in shape[2:]))
    b, spatial = shape[0], shape[2:]
    vis = _visible_grid(b, tuple(s // p for s in spatial), 0.4)
    g = torch.Generator().manual_seed(2)
    target = torch.randn(shape, generator=g)
    pred = torch.randn(shape, generator=g).requires_grad_()
    if provider == "mae_unfused":
        loss_fn = lambda: mae_unfused_loss(pred, target, vis, p)  # noqa: E731
    else:
        loss_fn = lambda: tcm_kernels.masked_recon_loss(pred, target, vis, p, backend="cpu")  # noqa: E731

    def step():
        loss, per_patch = loss_fn()
        return torch.autograd.grad(loss, pred)

    if not benchmark.disabled:
        ref = mae_unfused_loss(pred.detach(), target, vis, p)[0]
        got = tcm_kernels.masked_recon_loss(pred.detach(), target, vis, p)[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # both providers compute the same loss
    bytes_moved = 5 * pred.numel() * 4  # ours: pred and target read in forward and in backward, grad written
    run(benchmark, step, group=f"recon_loss-fwd+bwd-{'x'.join(map(str, shape))}-p{p}", provider=provider,
        baseline=provider == "mae_unfused", bytes_moved=bytes_moved, shape=list(shape), patch=p, dtype="float32")
    if not benchmark.disabled:  # run() measured the allocator peak (after a warm-up call)
        peak = benchmark.extra_info["peak_mem_bytes"]
        benchmark.extra_info["extra_mem_ratio"] = (peak - pred.numel() * 4) / (pred.numel() * 4)


def test_allocator_peak_counts_temporaries():
    """The memory probe itself: a known 4 MB temporary shows up, freed memory does not."""
    x = torch.ones(1024, 1024)

    def fn():
        y = x * 2  # 4 MiB, freed at return
        return float(y.sum())

    assert 4 * 2**20 <= allocator_peak_bytes(fn) < 5 * 2**20
