"""What every public op computes in under ``torch.autocast``: the rule, in one place.

Custom ops have no autocast kernel of their own, so without a rule an op under autocast
receives whatever mix of dtypes the surrounding model produced (a bf16 activation and an
fp32 weight, a bf16 prediction and an fp32 target) and rejects it. Each public op is
therefore decorated with one of two policies, applied only while autocast is enabled for
the device of the op's first tensor argument:

* ``"lowp"`` -- convolutions and the densify layout op that feeds the decoder's convolutions:
  every fp32/fp16/bf16 tensor argument (features, weight, bias, mask token) is cast to the
  autocast dtype (``torch.get_autocast_dtype``); the kernels accumulate in fp32 and return
  the autocast dtype, like ``torch.nn.functional.conv*`` under autocast.
* ``"fp32"`` -- normalisations, losses and statistics (sparse norms, masked_recon_loss,
  info_nce, coral_loss, patch_scores): every fp32/fp16/bf16 tensor argument is cast to
  float32 and the result is float32, like autocast's own fp32 list (``layer_norm``,
  ``mse_loss``, ``softmax``...). Running-statistics buffers are already fp32, so the cast
  returns them as they are and their in-place update still reaches the module.

Masks and indices (``sample_mask``, ``upsample_mask``) are not decorated: bool and integer
tensors are never cast, and ``sample_mask`` converts its scores to fp32 itself.
fp64 tensors are left as they are, as autocast does. The op then runs with autocast
disabled, so the casts above are the only ones. Gradients flow through the casts back to
the fp32 parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from .sparse_tensor import SparseTensor

F = TypeVar("F", bound=Callable)
POLICIES = ("lowp", "fp32")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _device_type(args: tuple, kwargs: dict) -> str | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, SparseTensor):
            return value.features.device.type
    return None


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in _CASTABLE else value
    if isinstance(value, SparseTensor) and value.features.dtype in _CASTABLE:
        return value.replace_features(value.features.to(dtype))
    return value


def autocast_rule(policy: str) -> Callable[[F], F]:
    """Decorate a public op with its autocast policy (``"lowp"`` or ``"fp32"``, module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"autocast_rule: policy must be one of {POLICIES}, got {policy!r}")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            device_type = _device_type(args, kwargs)
            if device_type is None or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.float32 if policy == "fp32" else torch.get_autocast_dtype(device_type)
            args = tuple(_cast(a, dtype) for a in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
