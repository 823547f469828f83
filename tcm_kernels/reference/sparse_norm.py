"""Plain-PyTorch references of the sparse normalizations (both layouts), of the norm engine's
reductions, and of densify.

Masked-dense: x [B, C, *S] with mask bool [B, 1, *S] (True = active site); the output is zero
at inactive sites. Compact: features [N, C], one row per active site, with the sample of each
row (any row order). Statistics are biased mean/variance over the active sites of each
statistic group, computed in the op-math dtype (float32, float64 for float64 inputs) by the
textbook two-pass formula.
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


def _update_running(running_mean, running_var, mean, var, n, momentum):
    """nn.BatchNorm's update: the unbiased variance var n / (n - 1) (0 for n = 1)."""
    with torch.no_grad():
        unbiased = var * n / (n - 1).clamp_min(1)
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))


def sparse_batch_norm(x, mask, running_mean=None, running_var=None, weight=None, bias=None, training=True,
                      momentum=0.1, eps=1e-5):
    """Batch norm over the active sites of every channel; updates running stats like nn.BatchNorm."""
    xf, m = x.to(accumulation_dtype(x.dtype)), mask.to(accumulation_dtype(x.dtype))
    dims = (0,) + tuple(range(2, x.dim()))
    if training or running_mean is None:
        n, mean, var = _masked_moments(xf, m, dims)
        if training and running_mean is not None:
            _update_running(running_mean, running_var, mean.flatten(), var.flatten(), n.flatten(), momentum)
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


def segment_moments(x, segment, num_segments):
    """The engine's ``moments`` over rows: x [N, C], segment int [N] (None = all 0) ->
    (count [S], mean [S, C], M2 [S, C]) in the op-math dtype, two-pass."""
    xf = x.to(accumulation_dtype(x.dtype))
    seg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if segment is None else segment.long()
    count = xf.new_zeros(num_segments).index_add(0, seg, xf.new_ones(x.shape[0]))
    mean = xf.new_zeros(num_segments, x.shape[1]).index_add(0, seg, xf) / count.clamp_min(1)[:, None]
    xc = xf - mean[seg]
    return count, mean, xf.new_zeros(num_segments, x.shape[1]).index_add(0, seg, xc * xc)


def segment_grad_moments(dy, x, segment, center):
    """The engine's ``grad_moments`` over rows: (sum dy, sum dy (x - center[segment])) [S, C]."""
    acc = center.dtype
    seg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if segment is None else segment.long()
    g = dy.to(acc)
    zero = center.new_zeros(center.shape)
    return zero.index_add(0, seg, g), zero.index_add(0, seg, g * (x.to(acc) - center[seg]))


def segment_scale_shift(x, segment, center, scale, shift):
    """The engine's ``scale_shift`` over rows: (x - center[s]) * scale[s] + shift[s], dtype of x."""
    seg = 0 if segment is None else segment.long()
    return ((x.to(center.dtype) - center[seg]) * scale[seg] + shift[seg]).to(x.dtype)


def segment_norm_backward(dy, x, segment, dy_scale, x_scale, center, shift):
    """The engine's ``norm_backward`` over rows: dy dy_scale[s] + (x - center[s]) x_scale[s] + shift[s]."""
    seg = 0 if segment is None else segment.long()
    acc = center.dtype
    return (dy.to(acc) * dy_scale[seg] + (x.to(acc) - center[seg]) * x_scale[seg] + shift[seg]).to(x.dtype)


def compact_batch_norm(features, running_mean=None, running_var=None, weight=None, bias=None, training=True,
                       momentum=0.1, eps=1e-5):
    """Batch norm over the rows of features [N, C]; updates running stats like nn.BatchNorm."""
    xf = features.to(accumulation_dtype(features.dtype))
    if training or running_mean is None:
        var, mean = torch.var_mean(xf, 0, correction=0)
        if training and running_mean is not None:
            _update_running(running_mean, running_var, mean, var, xf.new_tensor(float(xf.shape[0])), momentum)
    else:
        mean, var = running_mean.to(xf.dtype), running_var.to(xf.dtype)
    return _affine((xf - mean) / torch.sqrt(var + eps), weight, bias).to(features.dtype)


def compact_group_norm(features, batch_index, batch_size, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm per (sample, group of C / num_groups channels) over the rows of each sample.

    features [N, C]; batch_index int [N] in [0, batch_size), any row order.
    """
    xf = features.to(accumulation_dtype(features.dtype))
    n, c = xf.shape
    xg = xf.reshape(n, num_groups, c // num_groups)
    seg = batch_index.long()
    count = xf.new_zeros(batch_size).index_add(0, seg, xf.new_ones(n)).clamp_min(1)[:, None] * (c // num_groups)
    mean = xg.new_zeros(batch_size, num_groups, c // num_groups).index_add(0, seg, xg).sum(2) / count
    xc = xg - mean[seg][..., None]
    var = xg.new_zeros(batch_size, num_groups, c // num_groups).index_add(0, seg, xc * xc).sum(2) / count
    y = (xc / torch.sqrt(var[seg][..., None] + eps)).reshape(n, c)
    return _affine(y, weight, bias).to(features.dtype)


def compact_instance_norm(features, batch_index, batch_size, weight=None, bias=None, eps=1e-5):
    """Instance norm per (sample, channel) over the rows of each sample (group norm with C groups)."""
    return compact_group_norm(features, batch_index, batch_size, features.shape[1], weight, bias, eps)


def densify(x, mask, mask_token):
    """x at active sites, the per-channel mask_token (shape [C] or [1, C, 1, ...]) elsewhere."""
    token = mask_token.reshape((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)
    return torch.where(mask, x, token)
