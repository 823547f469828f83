"""Where one fwd+bwd step of a 3-D sparse encoder spends its time: ``python -m benchmarks.profile_encoder3d``.

One warm-up step on a small input (2 x 2 x 2 patches, batch 1: lazy initialisation, kernel selection), then
one step at the requested shape under ``torch.profiler``; every profiled CPU event's self time goes to one
category, printed as a table with the machine (CPU model, ISA, threads), the shape and the load:

* conv fwd / conv bwd: the submanifold 3^d convs (``tcm_kernels.nn.SubMConv3d``, stem included) and their
  backward;
* norms: the sparse norms, forward and backward;
* downsample: the strided convs between stages (3^d stride-2 conv and 1^d stride-2 projection shortcut of
  ``resenc3d``; ``SparseDownsample3d`` of ``resnet3d``), forward and backward, without their site maps;
* kernel maps: building the neighbour grids (``KernelMap``), the coarse sites and window rows of a strided conv;
* copies: copy-like ATen ops anywhere (``copy_``, ``clone``, ``contiguous``, ``cat``, ``stack``, ``_to_copy``),
  e.g. weight re-layouts;
* activations + adds: (leaky) ReLU and residual adds, forward and backward;
* layout: image to rows (``SparseTensor.from_dense``) and stage outputs back to masked-dense (``dense``);
* other: the rest (the loss sum, autograd's bookkeeping, ...).

A forward op is categorised by the innermost module range around it (forward hooks put a profiler range around
every conv / norm / downsample module); a backward node inherits the category of the forward op that created
it (autograd's sequence number). The same encoder, shape and mask as ``benchmarks/bench_encoder.py``.

    python -m benchmarks.profile_encoder3d                          # resenc3d, 96^3, batch 2, 40 % visible
    python -m benchmarks.profile_encoder3d --encoder resnet3d --visible 0.6
    python -m benchmarks.profile_encoder3d --backend reference      # the dense emulation, for comparison
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import tcm_kernels.nn as tnn
from benchmarks.bench_encoder import _mask
from benchmarks.common import cpu_isa, cpu_model
from tcm_kernels import KernelMap, SparseTensor
from tcm_mim.models import build_encoder, set_backend
from tcm_mim.models import layers
from tcm_mim.models.layers import SparseStridedConv

CATEGORIES = ("conv fwd", "conv bwd", "norms", "downsample", "kernel maps", "copies", "activations + adds",
              "layout", "other")
_PREFIX = "tcm_profile::"
_MODULE_CATEGORY = ((tnn.SubMConv3d, "conv"), (SparseStridedConv, "downsample"),
                    (tnn.SparseDownsample3d, "downsample"),
                    ((tnn.SparseInstanceNorm3d, tnn.SparseBatchNorm3d, tnn.SparseLayerNorm), "norms"))
_COPIES = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack", "aten::_to_copy"}
_ACTIVATIONS = ("relu", "threshold", "Threshold", "aten::add", "AddBackward", "ReluBackward")


def _range_hooks(model: nn.Module) -> list:
    """Forward pre/post hooks that open and close a profiler range named after each module's category."""
    handles = []
    for m in model.modules():
        category = next((c for cls, c in _MODULE_CATEGORY if isinstance(m, cls)), None)
        if category is None:
            continue
        stack: list[record_function] = []

        def enter(_m, _args, stack=stack, name=_PREFIX + category):
            stack.append(record_function(name))
            stack[-1].__enter__()

        def leave(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    return handles


def _wrap(owner, name: str, category: str):
    """Run ``owner.name`` (a function or classmethod) inside a profiler range of ``category``; returns an undo."""
    original = owner.__dict__[name]
    fn = original.__func__ if isinstance(original, classmethod) else original

    def wrapped(*args, **kwargs):
        with record_function(_PREFIX + category):
            return fn(*args, **kwargs)

    setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
    return lambda: setattr(owner, name, original)


def _function_ranges() -> list:
    """Ranges around the site-map builders and the layout changes (undo callables)."""
    targets = [(KernelMap, "from_coords", "kernel maps"), (KernelMap, "from_sites", "kernel maps"),
               (SparseTensor, "coarsen", "kernel maps"), (layers, "_window_rows", "kernel maps"),
               (SparseTensor, "from_dense", "layout"), (SparseTensor, "dense", "layout")]
    return [_wrap(owner, name, cat) for owner, name, cat in targets if name in vars(owner)]


def breakdown(events) -> dict[str, float]:
    """Self CPU seconds per category of a profiler's events (``prof.events()``)."""
    roots = [e for e in events if e.cpu_parent is None]
    fwd_category: dict[int, str] = {}  # autograd sequence number -> category of the forward op

    def forward_pass(e, inherited: str | None) -> None:
        category = e.name[len(_PREFIX):] if e.name.startswith(_PREFIX) else inherited
        if category is not None and e.sequence_nr >= 0:
            fwd_category.setdefault(e.sequence_nr, category)
        for c in e.cpu_children:
            forward_pass(c, category)

    for r in roots:
        if not r.name.startswith("autograd::engine"):
            forward_pass(r, None)

    totals: dict[str, float] = defaultdict(float)

    def assign(e, inherited: str | None, backward: bool) -> None:
        category = inherited
        if e.name.startswith(_PREFIX):
            category = e.name[len(_PREFIX):]
        elif backward and e.sequence_nr >= 0 and e.sequence_nr in fwd_category and category is None:
            category = fwd_category[e.sequence_nr]
        if e.name in _COPIES:
            bucket = "copies"
        elif category == "conv":
            bucket = "conv bwd" if backward else "conv fwd"
        elif category is not None:
            bucket = category
        elif any(k in e.name for k in _ACTIVATIONS):
            bucket = "activations + adds"
        else:
            bucket = "other"
        totals[bucket] += e.self_cpu_time_total / 1e6
        for c in e.cpu_children:
            assign(c, category, backward)

    for r in roots:
        assign(r, None, r.name.startswith("autograd::engine"))
    return {c: totals.get(c, 0.0) for c in CATEGORIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_encoder3d", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="resenc3d", help="a 3-D encoder of build_encoder (default resenc3d)")
    parser.add_argument("--side", type=int, default=96, help="cubic crop side in voxels (default 96)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch (default 2)")
    parser.add_argument("--visible", type=float, default=0.4, help="visible fraction of the patches (default 0.4)")
    parser.add_argument("--backend", default=None, help="None (compact, default) or reference (dense emulation)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    enc = build_encoder(args.encoder, dim=3, in_channels=1)
    set_backend(enc, args.backend)
    patch = enc.downsample_ratio
    if args.side % patch:
        parser.error(f"--side must be a multiple of {args.encoder}'s patch size {patch}, got {args.side}")
    mask = _mask(args.batch, 3, args.side, patch, args.visible)
    image = torch.randn(args.batch, 1, *(args.side,) * 3) * mask

    def step(image: torch.Tensor, mask: torch.Tensor) -> None:
        enc.zero_grad(set_to_none=True)
        feats = enc(image, mask)
        sum(f.sum() for f, _ in feats).backward()

    warm_mask = _mask(1, 3, 2 * patch, patch, 0.5)
    step(torch.randn(1, 1, *(2 * patch,) * 3) * warm_mask, warm_mask)  # warm-up, at a fraction of the cost
    handles, undo = _range_hooks(enc), _function_ranges()
    try:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(image, mask)
        wall = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
        for u in undo:
            u()
    totals = breakdown(prof.events())
    total = sum(totals.values())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.encoder} fwd+bwd, {args.side}^3, batch {args.batch}, {args.visible:.0%} visible, "
          f"backend {args.backend or 'default (compact)'}")
    print(f"{cpu_model()}, ISA {cpu_isa()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {load:.1f}; profiled step {wall:.2f} s wall, {total:.2f} s CPU in ops\n")
    print("| part | s | share |\n|---|---:|---:|")
    for c in CATEGORIES:
        print(f"| {c} | {totals[c]:.3f} | {totals[c] / total:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
