"""Plain-PyTorch references of the sparse (masked) normalizations and densify.

x is masked-dense [B, C, *S] with mask bool [B, 1, *S] (True = active site).
Statistics are biased mean/variance over the active sites of each statistic
group, computed in the op-math dtype (float32, float64 for float64 inputs) by the
textbook two-pass formula; the output is zero at inactive sites.
"""

from __future__ import annotations

import torch

from .._core.dtypes import accumulation_dtype


def _masked_moments(x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...]):
    """Values at inactive sites are never read (NaN/inf there stay out of the statistics, as in the kernels)."""
    on = m.expand_as(x) > 0
    n = m.expand_as(x).sum(dims, keepdim=True)
    mean = torch.where(on, x, 0).sum(dims, keepdim=True) / n.clamp_min(1)
    var = torch.where(on, x - mean, 0).pow(2).sum(dims, keepdim=True) / n.clamp_min(1)
    return n, mean, var


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def sparse_batch_norm(x, mask, running_mean=None, running_var=None, weight=None, bias=None, training=True,
                      momentum=0.1, eps=1e-5):
    """Batch norm over the active sites of every channel; updates running stats like nn.BatchNorm."""
    xf, m = x.to(accumulation_dtype(x.dtype)), mask.to(accumulation_dtype(x.dtype))
    dims = (0,) + tuple(range(2, x.dim()))
    if training or running_mean is None:
        n, mean, var = _masked_moments(xf, m, dims)
        if training and running_mean is not None:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1)
                running_mean.mul_(1 - momentum).add_(momentum * mean.flatten().to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.flatten().to(running_var.dtype))
    else:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = running_mean.to(xf.dtype).reshape(shape), running_var.to(xf.dtype).reshape(shape)
    y = _affine((xf - mean) / torch.sqrt(var + eps), weight, bias)
    return torch.where(mask, y, 0).to(x.dtype)


def sparse_group_norm(x, mask, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm: statistics per (sample, group of C / num_groups channels) over active sites."""
    b, c = x.shape[:2]
    xf, m = x.to(accumulation_dtype(x.dtype)), mask.to(accumulation_dtype(x.dtype))
    xg = xf.reshape(b, num_groups, c // num_groups, *x.shape[2:])
    mg = m.unsqueeze(1)
    _, mean, var = _masked_moments(xg, mg, tuple(range(2, xg.dim())))
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return torch.where(mask, _affine(y, weight, bias), 0).to(x.dtype)


def sparse_instance_norm(x, mask, weight=None, bias=None, eps=1e-5):
    """Instance norm: statistics per (sample, channel) over active sites (group norm with C groups)."""
    return sparse_group_norm(x, mask, x.shape[1], weight, bias, eps)


def sparse_layer_norm(x, mask, weight=None, bias=None, eps=1e-6, channels_last=False):
    """Layer norm over the channels of each site; inactive sites are zero.

    channels_last: x [B, *S, C] with mask [B, *S, 1]; otherwise x [B, C, *S] with mask [B, 1, *S].
    """
    xf = x.to(accumulation_dtype(x.dtype))
    dim = -1 if channels_last else 1
    mean = xf.mean(dim, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    shape = [1] * x.dim()
    shape[dim] = -1
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return torch.where(mask, y, 0).to(x.dtype)


def densify(x, mask, mask_token):
    """x at active sites, the per-channel mask_token (shape [C] or [1, C, 1, ...]) elsewhere."""
    token = mask_token.reshape((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)
    return torch.where(mask, x, token)
