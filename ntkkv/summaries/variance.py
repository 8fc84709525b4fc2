"""Merged slots with the keys' variance: the second cumulant of exp(s·q·δ) in log space."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ClusterSummary, Summarised
from .clusters import nearest_cluster, one_hot_assignment


def variance_cluster_cost(head_dim: int) -> float:
    """Token equivalents of one cluster: mean key, variances, mean value (3·d) and its size."""
    return (3 * head_dim + 1) / (2 * head_dim)


class VarianceClusterState:
    """Order 0 in log space with the second cumulant: per cluster the mean key μ, mean value v̄, size
    n and the keys' per-dimension variance σ², read as

        mass_c(q) = n · exp(s·q·μ + γ · ½ Σ_j (s·q_j)² σ_j²),    value_c = v̄.

    log mean exp(x·δ) ≈ ½ xᵀΣx is exact for Gaussian keys (here diagonal); zeroth order (a merged
    slot) drops it and underestimates every cluster's mass (Jensen). Real keys have lighter tails
    than the Gaussian the full term assumes, hence γ (`variance_scale`) below 1. The mass is
    positive by construction. 3·d + 1 numbers per cluster.
    """

    def __init__(self, variance_scale: float = 0.5):
        self.variance_scale = variance_scale
        self.means = self.mean_values = self.variances = self.counts = None

    def build(self, keys, values, assignment, num_clusters: int) -> VarianceClusterState:
        one_hot = one_hot_assignment(assignment, num_clusters)
        self.counts = one_hot.sum(dim=-1)
        size = self.counts.clamp_min(1)[..., None]
        self.means = (one_hot @ keys.float()) / size
        self.mean_values = (one_hot @ values.float()) / size
        self.variances = ((one_hot @ keys.float().square()) / size - self.means.square()).clamp_min(0)
        return self

    def fold(self, keys, values, weights=None) -> None:
        """Add decode tokens (the ratchet): each joins its nearest cluster (running mean and variance)."""
        for token in range(keys.shape[-2]):
            key, value = keys[:, :, token : token + 1].float(), values[:, :, token : token + 1].float()
            target = nearest_cluster(self.means, self.counts, key)  # (batch, kv_heads, 1)
            index = target[..., None].expand(-1, -1, -1, key.shape[-1])
            count = self.counts.gather(-1, target)[..., None]
            mean, variance = self.means.gather(2, index), self.variances.gather(2, index)
            new_mean = mean + (key - mean) / (count + 1)
            # Welford: the sum of squared deviations grows by (k - old mean)(k - new mean)
            new_variance = (variance * count + (key - mean) * (key - new_mean)) / (count + 1)
            old_value = self.mean_values.gather(2, index)
            self.means.scatter_(2, index, new_mean)
            self.variances.scatter_(2, index, new_variance.clamp_min(0))
            self.mean_values.scatter_(2, index, old_value + (value - old_value) / (count + 1))
            self.counts.scatter_add_(-1, target, torch.ones_like(count[..., 0]))

    def read(self, queries, scaling: float):
        x = queries.float() * scaling
        logits = (x @ self.means.transpose(-1, -2) + self.counts.log()[:, :, None]
                  + 0.5 * self.variance_scale * (x * x) @ self.variances.transpose(-1, -2))
        share = torch.nan_to_num(logits.softmax(dim=-1))
        return logits.logsumexp(dim=-1), share @ self.mean_values

    def size_in_tokens(self) -> float:
        if self.counts is None:
            return 0.0
        return self.counts.shape[-1] * variance_cluster_cost(self.means.shape[-1])


@dataclass
class MergeVariance(ClusterSummary):
    """A merged slot plus the keys' variance in log space (`VarianceClusterState`): 1.5 tokens a
    cluster at any head_dim ((3d + 1) / 2d).

    variance_scale: γ, the share of the Gaussian second cumulant applied (1 = keys taken as
        Gaussian; 0 = a plain merged slot).
    """

    variance_scale: float = 0.5

    name = "merge_variance"

    def cluster_cost(self, head_dim):
        return variance_cluster_cost(head_dim)

    def summarise_clusters(self, keys, values, assignment, clusters, layer_idx, window_queries, scaling):
        state = VarianceClusterState(self.variance_scale)
        return Summarised(state=state.build(keys, values, assignment, clusters))
