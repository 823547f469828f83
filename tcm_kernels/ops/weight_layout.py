"""The compiled conv engine's weight layout, laid out once per weight version instead of on every call.

The CPU implicit GEMM multiplies im2col rows (tap-major: K taps x Cin/g channels) by the weight in
GEMM layout ``[G, Cout/g, K, Cin/g]``; ``weight`` [Cout, Cin/g, *k] is channel-major, so every forward
re-laid it out and every backward built the flipped, in/out-transposed kernel and re-laid that out
too (copies as large as the weight; docs/submconv.md has their measured cost in a 3-D encoder).

:func:`cached_weight` returns a tensor equal to ``weight`` (same shape and values) whose storage *is*
the GEMM layout, so the engine's re-layout (``weight_to_gemm`` in csrc/submconv/submconv_problem.h:
reshape, permute, ``contiguous``) finds it contiguous and copies nothing. The layout is built on the
first call after the weight changed and kept in a cache keyed on the tensor's identity, its version
counter (bumped by every in-place update: optimizer steps, ``load_state_dict``, ``nn.init``), its
storage pointer (``param.data = ...``), dtype, device and ``groups``. The gradient reaches ``weight``
through an identity backward (:class:`_Relaid`). :func:`transposed_kernel` does the same for the
backward's input-gradient kernel, built from the cached layout.

Scope: fp32 CPU weights with more than one tap, outside ``torch.compile`` tracing, fake / meta tensors
and inference mode, where the plain re-layout runs as before. One entry per weight tensor, dropped when
the tensor is freed (a weak reference), holding the GEMM layout and, after the first backward, the
transposed one: up to twice the memory of the cached weights. Writes that bypass the version counter
(``param.data.copy_(...)``) are not seen: use in-place ops on the parameter under ``torch.no_grad()``
(as ``torch.optim`` does) or call :func:`clear_weight_cache`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .._core import geometry


@dataclass
class _Entry:
    ref: weakref.ref
    key: tuple
    gemm: torch.Tensor  # [G, Cout/g, K, Cin/g] contiguous
    transposed: torch.Tensor | None = None  # [G, Cin/g, K, Cout/g] contiguous, taps flipped; built on first use
    transposed_key: tuple | None = None  # the key ``transposed`` was built for
    views: int = 0  # tensors handed out over these buffers and still alive: while > 0 they are not overwritten


_ENTRIES: dict[int, _Entry] = {}  # id(weight) -> entry; removed by the weak reference's callback
_VIEWS: dict[int, tuple[weakref.ref, _Entry]] = {}  # id(tensor returned by cached_weight) -> its weight's entry


def clear_weight_cache() -> None:
    """Drop every cached layout (e.g. after writing to ``param.data``, which the version counter does not see)."""
    _ENTRIES.clear()
    _VIEWS.clear()


def _cacheable(weight: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or weight.is_inference():
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.layout != torch.strided:
        return False
    if isinstance(weight, torch._subclasses.FakeTensor) or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    return math.prod(weight.shape[2:]) > 1  # a 1^d kernel's GEMM layout is the weight itself


def _drop(key: int, table: dict) -> None:
    table.pop(key, None)


def _entry(weight: torch.Tensor, groups: int) -> _Entry:
    """The cache entry of ``weight``, brought up to date when the weight changed since it was laid out.

    A changed weight is laid out again into the entry's own buffers when no tensor handed out over
    them is alive (the usual case: the last step's graph is freed), so a training step allocates
    nothing: fresh weight-sized buffers cost page faults that, measured in a 3-D encoder step, took
    longer than the copy itself. Otherwise (a graph still holds the old layout) a new entry is made.
    """
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, groups, tuple(weight.shape))
    cout, cin_g = weight.shape[:2]
    laid_out = weight.detach().reshape(groups, cout // groups, cin_g, -1).transpose(2, 3)
    entry = _ENTRIES.get(id(weight))
    if entry is not None and entry.ref() is weight:
        if entry.key == key:
            return entry
        if entry.views == 0 and entry.key[2:] == key[2:]:
            entry.gemm.copy_(laid_out)
            entry.key = key
            return entry
    _ENTRIES.pop(id(weight), None)  # a stale entry's buffers go before the new ones are made (peak memory)
    entry = _Entry(weakref.ref(weight, lambda _, k=id(weight): _drop(k, _ENTRIES)), key, laid_out.contiguous())
    _ENTRIES[id(weight)] = entry
    return entry


def _hand_out(entry: _Entry, out: torch.Tensor, lookup: bool) -> torch.Tensor:
    """Count ``out`` as a live tensor over ``entry``'s buffers until it is freed (and, with ``lookup``,
    let :func:`transposed_kernel` find the entry from it)."""
    entry.views += 1
    key = id(out)
    if lookup:
        _VIEWS[key] = (weakref.ref(out), entry)
    weakref.finalize(out, _returned, entry, key, lookup)
    return out


def _returned(entry: _Entry, key: int, lookup: bool) -> None:
    entry.views -= 1
    if lookup:
        _VIEWS.pop(key, None)


def _as_kernel(layout: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """[G, C/g, K, C'/g] GEMM layout -> the equal [C, C'/g, *k] kernel as a view of it (no copy)."""
    g, rows, _, cols = layout.shape
    return layout.transpose(2, 3).reshape(g * rows, cols, *kernel)


class _Relaid(torch.autograd.Function):
    """weight -> an equal tensor stored in GEMM layout; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return _as_kernel(layout, tuple(weight.shape[2:]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def cached_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``weight`` [Cout, Cin/g, *k] as an equal tensor whose storage is the engine's GEMM layout.

    Differentiable (the gradient flows to ``weight`` unchanged). Returns ``weight`` itself where the
    cache does not apply (see the module docstring).
    """
    if not _cacheable(weight):
        return weight
    entry = _entry(weight, groups)
    return _hand_out(entry, _Relaid.apply(weight, entry.gemm), lookup=True)


def transposed_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`tcm_kernels._core.geometry.transposed_kernel` of ``weight``; from the cache when ``weight`` came
    from :func:`cached_weight` (built once per weight version, stored in GEMM layout), else computed.

    Outside the cache when the backward itself is differentiated (``create_graph=True``): the cached
    kernel carries no gradient to the weight.
    """
    seen = _VIEWS.get(id(weight))
    if seen is None or seen[0]() is not weight or torch.is_grad_enabled():
        return geometry.transposed_kernel(weight, groups)
    entry = seen[1]
    if entry.transposed_key != entry.key:  # [G, Cin/g, K, Cout/g], taps flipped: one pass over the layout
        taps = entry.gemm.shape[2]
        flip = torch.arange(taps - 1, -1, -1, device=entry.gemm.device)
        # The entry's views include the one being differentiated, so the old transposed buffer may still be
        # read by a live graph only if views > 1: then it is replaced, else rewritten in place.
        if entry.transposed is not None and entry.views == 1:
            torch.index_select(entry.gemm.permute(0, 3, 2, 1), 2, flip, out=entry.transposed)
        else:
            entry.transposed = entry.gemm.permute(0, 3, 2, 1).index_select(2, flip).contiguous()
        entry.transposed_key = entry.key
    return _hand_out(entry, _as_kernel(entry.transposed, tuple(weight.shape[2:])), lookup=False)
