"""A state per cluster of evicted tokens, read through a feature map around the cluster's mean key.

For higher orders than a merged slot, exp(s·q·δ) (δ = k − μ, x = s·q) is written as
φ_num(x)·φ_num(δ) and φ_den(x)·φ_den(δ) for a feature map: the Taylor expansion
(`ntkkv.summaries.taylor.TaylorFeatures`) or the learned map (`ntkkv.summaries.learned`).
"""

from __future__ import annotations

import math

import torch

from .clusters import nearest_cluster, one_hot_assignment


class ClusterState:
    """Per cluster: mean key μ, an optional projection P (d × rank), z = Σ φ_den(δ) and S = Σ φ_num(δ) vᵀ.

    Read with a query q: mass_c = exp(s·q·μ_c) · φ_den(s·q)·z_c, value_c = φ_num(s·q)·S_c / (φ_den·z_c),
    combined over clusters. With `centred=False` μ = 0 (the seed prototype); with `clamp`, the
    normaliser is floored and each value is clipped to the range of the values folded in.
    """

    def __init__(self, features, layer_idx: int = 0, centred: bool = True, rank: int | None = None,
                 clamp: bool = False):
        self.features, self.layer_idx = features, layer_idx
        self.centred, self.rank, self.clamp = centred, rank, clamp
        self.means = self.projection = self.counts = self.normaliser = self.numerator = None
        self.value_min = self.value_max = None

    # -- building (differentiable: the learned map trains through it) ------------------------
    def build(self, keys, values, assignment, num_clusters: int) -> ClusterState:
        """Summarise the tokens of each cluster (assignment -1: not part of the state), all clusters at
        once (in chunks of clusters that bound the memory of the per-cluster feature sums)."""
        batch, kv_heads, n, head_dim = keys.shape
        keys, values = keys.float(), values.float()
        one_hot = one_hot_assignment(assignment, num_clusters)  # (batch, kv_heads, clusters, n)
        self.counts = one_hot.sum(dim=-1)
        if self.centred:
            self.means = (one_hot @ keys) / self.counts.clamp_min(1)[..., None]
        else:
            self.means = keys.new_zeros(batch, kv_heads, num_clusters, head_dim)
        cluster = assignment.clamp_min(0)
        deltas = (keys - self.means.gather(2, cluster[..., None].expand(-1, -1, -1, head_dim))) \
            * (assignment >= 0)[..., None]
        if self.rank:
            covariance = torch.einsum("bhcn,bhnd,bhne->bhcde", one_hot, deltas, deltas)
            self.projection = top_directions(covariance, self.rank)  # (batch, kv_heads, clusters, d, rank)
            own = self.projection.gather(2, cluster[..., None, None].expand(-1, -1, -1, head_dim, self.rank))
            deltas = torch.einsum("bhnd,bhndr->bhnr", deltas, own)
        numerator_features, normaliser_features, _ = self.features(deltas, self.layer_idx, "key")
        self.normaliser = one_hot @ normaliser_features  # (batch, kv_heads, clusters, G)
        chunk = max(1, 2**24 // max(1, batch * kv_heads * n * numerator_features.shape[-1]))
        self.numerator = torch.cat([
            torch.einsum("bhcn,bhnf,bhnd->bhcfd", one_hot[:, :, start: start + chunk], numerator_features, values)
            for start in range(0, num_clusters, chunk)], dim=2) if num_clusters else \
            keys.new_zeros(batch, kv_heads, 0, numerator_features.shape[-1], head_dim)
        if self.clamp:
            present = (assignment >= 0)[..., None]
            # with nothing folded yet the range is [0, 0]; the first decode token replaces it
            self.value_min = torch.nan_to_num(values.masked_fill(~present, math.inf).amin(dim=-2), posinf=0.0)
            self.value_max = torch.nan_to_num(values.masked_fill(~present, -math.inf).amax(dim=-2), neginf=0.0)
        return self

    def fold(self, keys, values, weights=None) -> None:
        """Add decode tokens (the ratchet): each joins its nearest cluster, around that cluster's μ.
        No host synchronisation, no shape change: a captured decode step can run it."""
        keys, values = keys.float(), values.float()
        clusters = torch.arange(self.counts.shape[-1], device=keys.device)
        head_dim = keys.shape[-1]
        for token in range(keys.shape[-2]):
            key, value = keys[:, :, token : token + 1], values[:, :, token : token + 1]
            if self.centred:
                target = nearest_cluster(self.means, self.counts, key)[..., 0]  # (batch, kv_heads)
                starts = self.counts.gather(-1, target[..., None])[..., 0] == 0
                index = target[..., None, None].expand(-1, -1, 1, head_dim)
                # a token starting an empty cluster is its centre (its projection stays 0: δ = 0 anyway)
                self.means.scatter_(2, index, torch.where(starts[..., None, None], key, self.means.gather(2, index)))
            else:
                target = torch.zeros(key.shape[:2], dtype=torch.long, device=key.device)
            delta = key - self.means.gather(2, target[..., None, None].expand(-1, -1, 1, head_dim))
            if self.rank:
                own = self.projection.gather(2, target[..., None, None, None].expand(-1, -1, 1, head_dim, self.rank))
                delta = torch.einsum("bhnd,bhndr->bhnr", delta, own)
            numerator_features, normaliser_features, _ = self.features(delta, self.layer_idx, "key")
            joins = (target[..., None] == clusters).float()  # (batch, kv_heads, clusters)
            self.normaliser += joins[..., None] * normaliser_features
            self.numerator += joins[..., None, None] * (numerator_features.transpose(-1, -2) @ value)[:, :, None]
            if self.clamp:
                first = (self.counts.sum(dim=-1) == 0)[..., None]
                # in place: a captured decode step must update the tensors it was captured with
                self.value_min.copy_(torch.where(first, value[:, :, 0], torch.minimum(self.value_min, value[:, :, 0])))
                self.value_max.copy_(torch.where(first, value[:, :, 0], torch.maximum(self.value_max, value[:, :, 0])))
            self.counts.scatter_add_(-1, target[..., None], torch.ones_like(self.counts[..., :1]))

    # -- reading ------------------------------------------------------------------------------
    def read(self, queries, scaling: float):
        """queries (batch, kv_heads, m, d) -> log_mass (batch, kv_heads, m), mean_value (..., m, d)."""
        x = queries.float() * scaling
        logits = x @ self.means.transpose(-1, -2)  # (batch, kv_heads, m, clusters)
        if self.rank:
            projected = torch.einsum("bhmd,bhcdr->bhmcr", x, self.projection)
            numerator_features, normaliser_features, log_scale = self.features(projected, self.layer_idx, "query")
            normaliser = (normaliser_features * self.normaliser[:, :, None]).sum(dim=-1)
            numerator = torch.einsum("bhmcf,bhcfd->bhmcd", numerator_features, self.numerator)
        else:  # the query's features do not depend on the cluster: computed once
            numerator_features, normaliser_features, log_scale = self.features(x, self.layer_idx, "query")
            normaliser = torch.einsum("bhmf,bhcf->bhmc", normaliser_features, self.normaliser)
            numerator = torch.einsum("bhmf,bhcfd->bhmcd", numerator_features, self.numerator)
            log_scale = log_scale[..., None]
        if self.clamp:
            normaliser = normaliser.clamp_min(1e-6)
        normaliser = torch.where(self.counts[:, :, None] > 0, normaliser, torch.zeros_like(normaliser))
        cluster_mass = logits + normaliser.log() + log_scale  # -inf for an empty cluster
        cluster_value = torch.nan_to_num(numerator / normaliser[..., None])
        if self.clamp:
            cluster_value = torch.maximum(torch.minimum(cluster_value, self.value_max[:, :, None, None]),
                                          self.value_min[:, :, None, None])
        log_mass = cluster_mass.logsumexp(dim=-1)
        share = torch.nan_to_num(cluster_mass.softmax(dim=-1))
        return log_mass, (share[..., None] * cluster_value).sum(dim=-2)

    def size_in_tokens(self) -> float:
        if self.counts is None:
            return 0.0
        head_dim = self.means.shape[-1]
        return cluster_state_size(self.features, head_dim, self.counts.shape[-1], self.centred, self.rank, self.clamp)



def cluster_state_size(features, head_dim: int, num_clusters: int, centred: bool = True, rank: int | None = None,
                       clamp: bool = False) -> float:
    """Token equivalents (a token = 2·head_dim numbers) of a `ClusterState`: per cluster μ, P,
    the size n, z and S; with clamp, the value range."""
    numerator_size, normaliser_size = features.sizes(rank or head_dim)
    per_cluster = ((head_dim if centred else 0) + head_dim * (rank or 0) + 1 + normaliser_size
                   + numerator_size * head_dim)
    total = num_clusters * per_cluster + (2 * head_dim if clamp else 0)
    return total / (2 * head_dim)


def top_directions(covariance, rank: int) -> torch.Tensor:
    """(..., d, d) -> (..., d, rank): the top eigenvectors of each covariance Σ δδᵀ."""
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1)
