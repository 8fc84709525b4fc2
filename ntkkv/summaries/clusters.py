"""Grouping evicted tokens into clusters: k-means on the keys or positional runs, cluster means,
and the cluster a later token joins (the ratchet)."""

from __future__ import annotations

import math

import torch

CLUSTER_BY = ("position", "kmeans")


# -- grouping -----------------------------------------------------------------------------------

def assign_clusters(keys, evicted, num_clusters: int, by: str = "kmeans", iterations: int = 10,
                    limit: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster index (batch, kv_heads, n) of each evicted token, -1 for the others.

    by="position": contiguous runs of evicted tokens of (nearly) equal size;
    by="kmeans": Lloyd's k-means on the keys, started from farthest points (deterministic per sample).
    limit (batch, kv_heads) long, optional: the clusters each head may use, 0 .. limit - 1 (the others
    stay empty; a head with limit 0 assigns nothing); None: all `num_clusters`.
    """
    if by not in CLUSTER_BY:
        raise ValueError(f"unknown cluster_by {by!r}; choose one of: {', '.join(CLUSTER_BY)}")
    usable = num_clusters
    if limit is not None:
        usable = limit[..., None]  # (batch, kv_heads, 1)
        evicted = evicted & (usable > 0)
    if by == "position":
        count = evicted.sum(dim=-1, keepdim=True).clamp_min(1)
        rank = evicted.long().cumsum(dim=-1) - 1
        return torch.where(evicted, rank * usable // count, -1)
    points = keys.float()
    centres = farthest_points(points, evicted, num_clusters)
    outside = ~evicted[..., None]  # (batch, kv_heads, n, 1): no centre for a token not clustered
    if limit is not None:  # and none beyond a head's limit: its centres j >= limit are never nearest
        outside = outside | (torch.arange(num_clusters, device=keys.device) >= usable)[:, :, None, :]
    # a fixed number of rounds, with no test for convergence: a test would synchronise with the host,
    # and past a fixed point a round changes nothing
    for round_ in range(max(iterations, 1)):
        distances = torch.cdist(points, centres).masked_fill(outside, math.inf)
        assignment = torch.where(evicted, distances.argmin(dim=-1), -1)
        if round_ + 1 < iterations:
            means, counts = cluster_means(points, assignment, num_clusters)
            centres = torch.where(counts[..., None] > 0, means, centres)  # an emptied cluster keeps its centre
    return assignment


def farthest_points(points, allowed, count: int) -> torch.Tensor:
    """k-means' start, deterministic per sample and head: the allowed point nearest the mean, then
    repeatedly the allowed point farthest from those chosen. (batch, kv_heads, count, d)."""
    weights = allowed.float()[..., None]
    mean = (points * weights).sum(dim=-2, keepdim=True) / weights.sum(dim=-2, keepdim=True).clamp_min(1)
    distance = (points - mean).norm(dim=-1).masked_fill(~allowed, math.inf)
    chosen = [distance.argmin(dim=-1)]
    nearest = torch.full_like(distance, math.inf)
    for _ in range(count - 1):
        centre = points.gather(2, chosen[-1][..., None, None].expand(-1, -1, 1, points.shape[-1]))
        nearest = torch.minimum(nearest, (points - centre).norm(dim=-1))
        chosen.append(nearest.masked_fill(~allowed, -1.0).argmax(dim=-1))
    index = torch.stack(chosen, dim=-1)[..., None].expand(-1, -1, -1, points.shape[-1])
    return points.gather(2, index)


def cluster_means(points, assignment, num_clusters: int):
    """Mean (batch, kv_heads, clusters, d) and size (batch, kv_heads, clusters) of each cluster."""
    one_hot = one_hot_assignment(assignment, num_clusters)
    counts = one_hot.sum(dim=-1)
    means = (one_hot @ points.float()) / counts.clamp_min(1)[..., None]
    return means, counts


def one_hot_assignment(assignment, num_clusters: int) -> torch.Tensor:
    """(batch, kv_heads, clusters, n) float: 1 where token n belongs to the cluster."""
    clusters = torch.arange(num_clusters, device=assignment.device)
    return (assignment[:, :, None, :] == clusters[None, None, :, None]).float()


def nearest_cluster(centres, counts, keys) -> torch.Tensor:
    """Cluster (batch, kv_heads, m) a new key joins during decode: the nearest non-empty one,
    or, while some cluster is still empty, the first empty one (a token starts it)."""
    distances = torch.cdist(keys.float(), centres.float()).masked_fill((counts == 0)[:, :, None, :], math.inf)
    nearest = distances.argmin(dim=-1)
    empty = counts == 0
    first_empty = empty.float().argmax(dim=-1, keepdim=True).expand_as(nearest)
    return torch.where(empty.any(dim=-1, keepdim=True), first_empty, nearest)
