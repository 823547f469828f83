"""Plain-PyTorch oracle of the submanifold sparse convolution: SparK's dense emulation.

Submanifold semantics: the active set never grows. The result is the dense
convolution of the masked input, masked again, so inactive sites are exactly 0
and an active site only sees active neighbours. Values at inactive sites are never
read (selected away, not multiplied by 0), so NaN or inf there does not reach the
output, as in the compiled and Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV = {2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}


def as_tuple(value: int | tuple[int, ...] | list[int], nd: int) -> tuple[int, ...]:
    """``value`` as ``nd`` ints (an int is repeated)."""
    return (int(value),) * nd if isinstance(value, int) else tuple(int(v) for v in value)


def submanifold_conv(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     dilation: int | tuple[int, ...] = 1, groups: int = 1) -> torch.Tensor:
    """``conv(x * mask) * mask`` with "same" padding; x [B, C, *S], mask bool [B, 1, *S], weight [Cout, C/groups, *k]."""
    nd = x.dim() - 2
    dil = as_tuple(dilation, nd)
    padding = tuple(d * (k - 1) // 2 for d, k in zip(dil, weight.shape[2:]))
    y = _CONV[nd](torch.where(mask, x, 0), weight, bias, padding=padding, dilation=dil, groups=groups)
    return torch.where(mask, y, 0)


def downsample_mask(mask: torch.Tensor, stride: int | tuple[int, ...]) -> torch.Tensor:
    """bool [B, 1, *S] -> bool [B, 1, *(S // stride)]: a coarse site is active if any fine site under it is."""
    nd = mask.dim() - 2
    s = as_tuple(stride, nd)
    return _MAX_POOL[nd](mask.float(), kernel_size=s, stride=s) > 0


def sparse_downsample(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      stride: int | tuple[int, ...] = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided conv with kernel = stride of the masked input; output masked by the max-pooled mask."""
    nd = x.dim() - 2
    s = as_tuple(stride, nd)
    mask_out = downsample_mask(mask, s)
    y = _CONV[nd](torch.where(mask, x, 0), weight, bias, stride=s)
    return torch.where(mask_out, y, 0), mask_out


def submanifold_conv_compact(features: torch.Tensor, grid: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, dilation: int | tuple[int, ...] = 1,
                             groups: int = 1) -> torch.Tensor:
    """Compact rows features [N, C] at ``sites`` of ``grid`` [B, *S]: scatter to masked-dense, dense conv, gather.

    -> [N, Cout], row i at the site of input row i.
    """
    batch, *spatial = grid.shape
    dense = features.new_zeros((grid.numel(), features.shape[1])).index_copy(0, sites, features)
    x = dense.reshape(batch, *spatial, -1).movedim(-1, 1)
    y = submanifold_conv(x, (grid >= 0).unsqueeze(1), weight, bias, dilation=dilation, groups=groups)
    return y.movedim(1, -1).reshape(grid.numel(), -1).index_select(0, sites)
