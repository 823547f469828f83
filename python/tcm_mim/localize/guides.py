"""Score providers that need no text: AnatoMask's reconstruction guide and AMLP's cluster guide.

Both return what a localizer returns (a [*S] float32 map in [0, 1], constant over each patch), so
``tcm_kernels.patch_scores`` + ``sample_mask`` consume them the same way; the prompt is ignored.
They change as the model trains, so do not put them in a SaliencyCache across epochs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..data.scan import LabelMap


def _as_volume(image, op: str) -> torch.Tensor:
    x = image if isinstance(image, torch.Tensor) else torch.as_tensor(image)
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: image must be [H, W] or [D, H, W], got shape {tuple(x.shape)}")
    return x.float()


def _patch_tuple(patch_size: int | tuple[int, ...], shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    ps = (patch_size,) * len(shape) if isinstance(patch_size, int) else tuple(patch_size)
    if len(ps) != len(shape) or any(s % p for s, p in zip(shape, ps)):
        raise ValueError(f"{op}: patch_size {patch_size} must divide the image shape {shape}")
    return ps


def _grid(shape: tuple[int, ...], ps: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // p for s, p in zip(shape, ps))


def _to_pixels(per_patch: torch.Tensor, shape: tuple[int, ...], ps: tuple[int, ...]) -> torch.Tensor:
    """[N] patch values (row-major grid order, as patch_scores) -> [*S] map."""
    out = per_patch.reshape(_grid(shape, ps))
    for dim, p in enumerate(ps):
        out = out.repeat_interleave(p, dim=dim)
    return out.contiguous()


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def patch_features(volume: torch.Tensor, ps: tuple[int, ...]) -> torch.Tensor:
    """Default patch descriptors [N, 3]: mean, standard deviation and mean gradient magnitude."""
    grads = torch.gradient(volume)
    edge = torch.sqrt(sum(g * g for g in grads))
    feats = []
    for channel in (volume, volume * volume, edge):
        x = channel[None, None]
        pool = torch.nn.functional.avg_pool2d if volume.dim() == 2 else torch.nn.functional.avg_pool3d
        feats.append(pool(x, kernel_size=ps, stride=ps).flatten())
    mean, mean_sq, edge_mean = feats
    std = (mean_sq - mean * mean).clamp_min(0).sqrt()
    return torch.stack([mean, std, edge_mean], dim=1)


class ReconstructionGuide:
    """AnatoMask: patches an EMA teacher reconstructs worst are the anatomically significant ones.

    Args:
        patch_loss: callable image [1, 1, *S] -> per-patch reconstruction loss [1, N] or [N]
            (e.g. the teacher's ``per_patch`` output of ``tcm_kernels.masked_recon_loss``).
        patch_size: the patch size N was computed with (int or one int per dim).
    """

    def __init__(self, patch_loss: Callable[[torch.Tensor], torch.Tensor], patch_size: int | tuple[int, ...]):
        self.patch_loss = patch_loss
        self.patch_size = patch_size
        self.cache_key = f"ReconstructionGuide({id(patch_loss)})"

    @torch.no_grad()
    def __call__(self, image, prompt: str | None = None, *, labels: LabelMap | None = None) -> torch.Tensor:
        """[*S] float32 in [0, 1]: each patch's loss, min-max scaled over the image."""
        volume = _as_volume(image, "ReconstructionGuide")
        ps = _patch_tuple(self.patch_size, tuple(volume.shape), "ReconstructionGuide")
        loss = torch.as_tensor(self.patch_loss(volume[None, None])).float().reshape(-1)
        n = int(torch.tensor(_grid(tuple(volume.shape), ps)).prod())
        if loss.numel() != n:
            raise ValueError(f"ReconstructionGuide: patch_loss must return {n} values (one a patch), "
                             f"got {loss.numel()}")
        return _to_pixels(_minmax(loss.cpu()), tuple(volume.shape), ps)


class ClusterGuide:
    """AMLP: k-means over patch features; the lesion cluster and the hard patches score high.

    score = cluster_weight * [patch in the lesion cluster] + (1 - cluster_weight) * difficulty,
    where the lesion cluster is the one with the highest mean reconstruction loss when
    ``patch_loss`` is given, else the smallest cluster (lesions are the rare tissue), and
    difficulty is the min-max scaled loss, else the distance to the largest cluster's centre.

    Args:
        patch_size: int or one int per spatial dim.
        num_clusters: k of k-means (2: lesion vs background).
        features: callable image [*S] -> [N, D]; default :func:`patch_features`.
        patch_loss: optional callable image [1, 1, *S] -> [1, N] or [N] reconstruction loss.
        cluster_weight: in [0, 1], the weight of cluster membership against difficulty.
        iterations: Lloyd iterations; seed: k-means++ initialisation seed (deterministic).
    """

    def __init__(self, patch_size: int | tuple[int, ...], *, num_clusters: int = 2,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 patch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None, cluster_weight: float = 0.5,
                 iterations: int = 25, seed: int = 0) -> None:
        if num_clusters < 2:
            raise ValueError(f"ClusterGuide: num_clusters must be >= 2, got {num_clusters}")
        if not 0.0 <= cluster_weight <= 1.0:
            raise ValueError(f"ClusterGuide: cluster_weight must be in [0, 1], got {cluster_weight}")
        self.patch_size = patch_size
        self.num_clusters = num_clusters
        self.features = features
        self.patch_loss = patch_loss
        self.cluster_weight = cluster_weight
        self.iterations = iterations
        self.seed = seed
        self.cache_key = (f"ClusterGuide(k={num_clusters},w={cluster_weight},seed={seed},"
                          f"{id(features)},{id(patch_loss)})")

    @torch.no_grad()
    def __call__(self, image, prompt: str | None = None, *, labels: LabelMap | None = None) -> torch.Tensor:
        """[*S] float32 in [0, 1], constant over each patch."""
        volume = _as_volume(image, "ClusterGuide")
        shape = tuple(volume.shape)
        return _to_pixels(self.patch_scores(volume), shape, _patch_tuple(self.patch_size, shape, "ClusterGuide"))

    @torch.no_grad()
    def categorize(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch (row-major, as ``tcm_kernels.patch_scores``) of an image [H, W] or [D, H, W]:
        (lesion bool [N]: in the lesion cluster, difficulty float32 [N] in [0, 1])."""
        volume = _as_volume(image, "ClusterGuide")
        shape = tuple(volume.shape)
        ps = _patch_tuple(self.patch_size, shape, "ClusterGuide")
        feats = self.features(volume) if self.features is not None else patch_features(volume, ps)
        n = int(torch.tensor(_grid(shape, ps)).prod())
        if feats.dim() != 2 or feats.shape[0] != n:
            raise ValueError(f"ClusterGuide: features must be [{n}, D], got {tuple(feats.shape)}")
        assign, centres = self.kmeans(feats.float())
        sizes = torch.bincount(assign, minlength=self.num_clusters)
        background = int(sizes.argmax())
        if self.patch_loss is not None:
            loss = torch.as_tensor(self.patch_loss(volume[None, None])).float().reshape(-1).cpu()
            mean_loss = torch.stack([loss[assign == c].mean() if sizes[c] else loss.new_tensor(-float("inf"))
                                     for c in range(self.num_clusters)])
            lesion = int(mean_loss.argmax())
            difficulty = _minmax(loss)
        else:
            lesion = int(torch.where(sizes > 0, sizes, sizes.max() + 1).argmin())
            z = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
            difficulty = _minmax((z - centres[background]).norm(dim=1))
        return assign == lesion, difficulty

    def patch_scores(self, image) -> torch.Tensor:
        """float32 [N] in [0, 1]: the score of each patch (class docstring), without the pixel map."""
        lesion, difficulty = self.categorize(image)
        return self.cluster_weight * lesion.float() + (1 - self.cluster_weight) * difficulty

    def kmeans(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means on standardised features: (assignment int64 [N], centres [k, D])."""
        z = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(self.seed)
        centres = [z[torch.randint(len(z), (1,), generator=gen)].squeeze(0)]
        for _ in range(1, self.num_clusters):  # k-means++: next centre far from the chosen ones
            d2 = torch.cdist(z, torch.stack(centres)).min(1).values ** 2
            if d2.sum() <= 0:
                centres.append(z[torch.randint(len(z), (1,), generator=gen)].squeeze(0))
            else:
                centres.append(z[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
        c = torch.stack(centres)
        for _ in range(self.iterations):
            assign = torch.cdist(z, c).argmin(1)
            new = torch.stack([z[assign == k].mean(0) if (assign == k).any() else c[k]
                               for k in range(self.num_clusters)])
            if torch.allclose(new, c):
                break
            c = new
        return torch.cdist(z, c).argmin(1), c
