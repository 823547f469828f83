"""Every public op under CPU ``torch.autocast``: the rule of tcm_kernels/_autocast.py.

Convolutions (and densify) compute in the autocast dtype, norms / losses / statistics in fp32,
masks are untouched. Inputs mix what a model under autocast produces: a low-precision
activation beside fp32 parameters. Each op under autocast must equal, bit for bit, the same op
called outside autocast on its inputs cast by the rule (the rule is "cast, then run"), return
the dtype of its policy, and send gradients of each input's own dtype back (fp32 to fp32 parameters).
"""

from __future__ import annotations

import pytest
import torch

import tcm_kernels
from tcm_kernels import SparseTensor
from tcm_kernels.ops import sparse_norm_compact as compact

LOWP = (torch.bfloat16, torch.float16)


def _mask(b: int, *spatial: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, *spatial, generator=g) > 0.4
    m[:, :, 0, 0] = True  # every sample has an active site
    return m


def _cast(v, dtype):
    if isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return v.to(dtype)
    if isinstance(v, SparseTensor):
        return v.replace_features(v.features.to(dtype))
    return v


def _cases(act: torch.dtype):
    """(name, policy, fn, args): ``act`` is the activation dtype, parameters are fp32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g).to(act)
    mask = _mask(2, 6, 6)
    x = x * mask
    w3, bias = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
    w2 = torch.randn(5, 4, 2, 2, generator=g)
    gamma, beta = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    sp = SparseTensor.from_dense(x, mask)
    feats = sp.features
    pred, target = torch.randn(2, 1, 8, 8, generator=g).to(act), torch.rand(2, 1, 8, 8, generator=g)
    visible = torch.tensor([[True, False, False, True], [False, True, False, False]])
    za, zb = torch.randn(6, 8, generator=g).to(act), torch.randn(6, 8, generator=g)
    batch_index = sp.coords[:, 0].long()
    return [
        ("submanifold_conv", "lowp", lambda *a: tcm_kernels.submanifold_conv(*a), (x, mask, w3, bias)),
        ("submanifold_conv_compact", "lowp", lambda f, w, b: tcm_kernels.submanifold_conv_compact(
            f, sp.kernel_map(), w, b), (feats, w3, bias)),
        ("sparse_downsample", "lowp", lambda *a: tcm_kernels.sparse_downsample(*a, stride=2)[0], (x, mask, w2, bias)),
        ("sparse_downsample_compact", "lowp", lambda s, w, b: tcm_kernels.sparse_downsample_compact(
            s, w, b, stride=2).features, (sp, w2, bias)),
        ("densify", "lowp", tcm_kernels.densify, (x, mask, torch.randn(4, generator=g))),
        ("sparse_batch_norm", "fp32", lambda *a: tcm_kernels.sparse_batch_norm(
            a[0], a[1], None, None, a[2], a[3]), (x, mask, gamma, beta)),
        ("sparse_group_norm", "fp32", lambda *a: tcm_kernels.sparse_group_norm(a[0], a[1], 2, a[2], a[3]),
         (x, mask, gamma, beta)),
        ("sparse_instance_norm", "fp32", tcm_kernels.sparse_instance_norm, (x, mask, gamma, beta)),
        ("sparse_layer_norm", "fp32", tcm_kernels.sparse_layer_norm, (x, mask, gamma, beta)),
        ("compact_batch_norm", "fp32", lambda f, w, b: compact.compact_batch_norm(f, None, None, w, b),
         (feats, gamma, beta)),
        ("compact_group_norm", "fp32", lambda f, w, b: compact.compact_group_norm(f, batch_index, 2, 2, w, b),
         (feats, gamma, beta)),
        ("compact_instance_norm", "fp32", lambda f, w, b: compact.compact_instance_norm(f, batch_index, 2, w, b),
         (feats, gamma, beta)),
        ("compact_layer_norm", "fp32", compact.compact_layer_norm, (feats, gamma, beta)),
        ("masked_recon_loss", "fp32", lambda p, t: tcm_kernels.masked_recon_loss(p, t, visible, 4)[0],
         (pred, target)),
        ("info_nce", "fp32", lambda a, b: tcm_kernels.info_nce(a, b, temperature=0.2), (za, zb)),
        ("coral_loss", "fp32", tcm_kernels.coral_loss, (za, zb)),
        ("patch_scores", "fp32", lambda s: tcm_kernels.patch_scores(s, 2), (target.to(act),)),
    ]


CASE_NAMES = [c[0] for c in _cases(torch.bfloat16)]


@pytest.mark.parametrize("autocast_dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_op_under_cpu_autocast_follows_its_policy(name, autocast_dtype):
    _, policy, fn, args = next(c for c in _cases(autocast_dtype) if c[0] == name)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = fn(*args)
    compute = autocast_dtype if policy == "lowp" else torch.float32
    want = fn(*(_cast(a, compute) for a in args))
    assert got.dtype == compute, f"{name}: {got.dtype} under autocast, policy {policy} computes in {compute}"
    assert torch.equal(got, want), f"{name}: differs from the op on inputs cast to {compute}"
    got.float().square().sum().backward()
    reached = [t for t in leaves if t.grad is not None]  # a loss's target is a constant
    assert reached, f"{name}: no gradient reached the inputs"
    for t in reached:  # fp32 parameters get fp32 gradients through the casts, activations their own dtype
        assert t.grad.dtype == t.dtype and bool(torch.isfinite(t.grad).all()), f"{name}: grad {t.grad.dtype}"


def test_masks_are_untouched_by_autocast():
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    eager = tcm_kernels.sample_mask(scores, 0.5, strategy="weighted", seed=3, offset=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tcm_kernels.sample_mask(scores, 0.5, strategy="weighted", seed=3, offset=1)
        up = tcm_kernels.upsample_mask(inside.visible.reshape(3, 1, 4, 4), 2)
    for a, b in zip(eager, inside):
        assert torch.equal(a, b)
    assert up.dtype == torch.bool and torch.equal(up, tcm_kernels.upsample_mask(eager.visible.reshape(3, 1, 4, 4), 2))


def test_fp64_is_left_alone():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64) * _mask(2, 6, 6)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tcm_kernels.submanifold_conv(x, _mask(2, 6, 6), w, backend="reference")
    assert y.dtype == torch.float64
