"""Evicted tokens grouped into clusters, each summarised around its mean key.

exp(s·q·k) = exp(s·q·μ) · exp(s·q·δ) with δ = k − μ: expanding the second factor around
δ = 0 is accurate because a cluster's keys sit near its mean; expanding exp(s·q·k) around
k = 0 (the seed prototype) is not, since evicted scores are far from 0.

Order 0 of the expansion is a merged slot (mean key, mean value, score bias log n) that the
cache holds like a token (`merged_slots`). Higher orders need features of δ and of x = s·q
(`TaylorFeatures`) summed per cluster in a `ClusterState`.
"""

from __future__ import annotations

import math

import torch

CLUSTER_BY = ("position", "kmeans")


# -- grouping -----------------------------------------------------------------------------------

def assign_clusters(keys, evicted, num_clusters: int, by: str = "kmeans", iterations: int = 10) -> torch.Tensor:
    """Cluster index (batch, kv_heads, n) of each evicted token, -1 for the others.

    by="position": contiguous runs of evicted tokens of (nearly) equal size;
    by="kmeans": Lloyd's k-means on the keys, started from the positional runs (deterministic).
    """
    if by not in CLUSTER_BY:
        raise ValueError(f"unknown cluster_by {by!r}; choose one of: {', '.join(CLUSTER_BY)}")
    if by == "position":
        count = evicted.sum(dim=-1, keepdim=True).clamp_min(1)
        rank = evicted.long().cumsum(dim=-1) - 1
        return torch.where(evicted, rank * num_clusters // count, -1)
    points = keys.float()
    centres = farthest_points(points, evicted, num_clusters)
    assignment = None
    for _ in range(iterations):
        distances = torch.cdist(points, centres).masked_fill(~evicted[..., None], math.inf)
        updated = torch.where(evicted, distances.argmin(dim=-1), -1)
        if assignment is not None and torch.equal(updated, assignment):
            break
        assignment = updated
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


def merged_slots(keys, values, assignment, num_clusters: int):
    """Order 0: each cluster becomes one slot, its mean key and mean value, with bias log n
    (so that its weight n·exp(s·q·μ) stands for Σ exp(s·q·k)); an empty cluster gets -inf."""
    slot_keys, counts = cluster_means(keys, assignment, num_clusters)
    slot_values, _ = cluster_means(values, assignment, num_clusters)
    return slot_keys.to(keys.dtype), slot_values.to(values.dtype), counts.log()


def calibrated_slots(keys, values, assignment, num_clusters: int, queries, scaling: float):
    """Order 0 fitted to the observation window: merged slots whose bias and value make each
    cluster's weight and output right on average over `queries` (batch, kv_heads, w, d).

    The mean key stays; the bias is log n plus the window's mean log of Σ exp(s·q·δ)/n, which
    log n alone underestimates (Jensen: the mean of exp is at least exp of the mean); the value is
    the members' values weighted by their mean attention within the cluster. Same memory as
    `merged_slots`.
    """
    slot_keys, counts = cluster_means(keys, assignment, num_clusters)
    evicted = assignment >= 0
    cluster = assignment.clamp_min(0)
    deltas = keys.float() - slot_keys.gather(2, cluster[..., None].expand_as(keys))
    relative = (queries.float() @ deltas.transpose(-1, -2)) * scaling  # (batch, kv_heads, w, n)
    # a softmax within each cluster, through scatters: memory O(w·n), not O(w·clusters·n)
    relative = relative.masked_fill(~evicted[:, :, None], -math.inf)
    index = cluster[:, :, None].expand_as(relative)
    peak = relative.new_full(relative.shape[:-1] + (num_clusters,), -math.inf)
    peak = peak.scatter_reduce(-1, index, relative, "amax")  # (batch, kv_heads, w, clusters)
    weights = torch.where(evicted[:, :, None], (relative - peak.gather(-1, index)).exp(), 0.0)
    sums = torch.zeros_like(peak).scatter_add(-1, index, weights)
    log_mass = sums.log() + peak  # log Σ_{i in c} exp(s·q·δ_i); -inf for an empty cluster
    bias = torch.where(counts > 0, log_mass.mean(dim=2), -math.inf)
    attention = (weights / sums.gather(-1, index).clamp_min(torch.finfo(sums.dtype).tiny)).mean(dim=2)
    slot_values = one_hot_assignment(assignment, num_clusters) @ (attention[..., None] * values.float())
    return slot_keys.to(keys.dtype), slot_values.to(values.dtype), bias


def nearest_cluster(centres, counts, keys) -> torch.Tensor:
    """Cluster (batch, kv_heads, m) a new key joins during decode: the nearest non-empty one,
    or, while some cluster is still empty, the first empty one (a token starts it)."""
    distances = torch.cdist(keys.float(), centres.float()).masked_fill((counts == 0)[:, :, None, :], math.inf)
    nearest = distances.argmin(dim=-1)
    empty = counts == 0
    first_empty = empty.float().argmax(dim=-1, keepdim=True).expand_as(nearest)
    return torch.where(empty.any(dim=-1, keepdim=True), first_empty, nearest)


def fold_into_merged_slots(slot_keys, slot_values, slot_bias, keys, values):
    """Fold decode tokens (batch, kv_heads, m, d), one at a time, into merged slots in place:
    running means of key and value, bias log(n + 1)."""
    counts = slot_bias.exp()  # exp(-inf) = 0 for an empty slot
    for token in range(keys.shape[-2]):
        key, value = keys[:, :, token : token + 1], values[:, :, token : token + 1]
        target = nearest_cluster(slot_keys, counts, key)[..., None]  # (batch, kv_heads, 1, 1)
        count = counts.gather(-1, target[..., 0])[..., None]  # (batch, kv_heads, 1, 1)
        index = target.expand(-1, -1, -1, key.shape[-1])
        for slots, new in ((slot_keys, key), (slot_values, value)):
            old = slots.gather(2, index).float()
            slots.scatter_(2, index, ((old * count + new.float()) / (count + 1)).to(slots.dtype))
        counts.scatter_add_(-1, target[..., 0], torch.ones_like(count[..., 0]))
    slot_bias.copy_(counts.log())


# -- features for orders 1 and 2 ---------------------------------------------------------------

class TaylorFeatures:
    """exp(x·δ) ≈ 1 + x·δ (order 1) + ½(x·δ)² (order 2) as φ(x)·φ(δ).

    pairs="full": the whole quadratic term, r(r+1)/2 features; "diag": only Σ ½ x_j² δ_j², r features.
    The normaliser drops the linear term: it is 0 for a centred cluster, and without it the
    normaliser is n + ½Σ(x·δ)² ≥ n > 0 even after decode tokens fold in off-centre
    (`normaliser_linear=True` keeps it, as the seed prototype did).
    """

    def __init__(self, order: int, pairs: str = "full", normaliser_linear: bool = False):
        if order not in (1, 2):
            raise ValueError(f"Taylor order must be 1 or 2, got {order!r}")
        if pairs not in ("full", "diag"):
            raise ValueError(f"unknown pairs {pairs!r}; choose one of: full, diag")
        self.order, self.pairs, self.normaliser_linear = order, pairs, normaliser_linear

    def quadratic_size(self, r: int) -> int:
        if self.order < 2:
            return 0
        return r * (r + 1) // 2 if self.pairs == "full" else r

    def sizes(self, r: int) -> tuple[int, int]:
        """(numerator features, normaliser features) for vectors of size r."""
        quadratic = self.quadratic_size(r)
        return 1 + r + quadratic, 1 + quadratic + (r if self.normaliser_linear else 0)

    def _quadratic(self, x):
        if self.pairs == "diag":
            return x * x / math.sqrt(2)
        rows, cols = torch.triu_indices(x.shape[-1], x.shape[-1], device=x.device)
        weight = torch.where(rows == cols, 1 / math.sqrt(2), 1.0).to(x.dtype)
        return x[..., rows] * x[..., cols] * weight

    def __call__(self, x, layer_idx: int = 0, side: str = "key"):
        """Features of x (..., r): (numerator (..., F), normaliser (..., G), log scale (...)); the
        same on both sides."""
        one = torch.ones_like(x[..., :1])
        quadratic = [self._quadratic(x)] if self.order == 2 else []
        numerator = torch.cat([one, x, *quadratic], dim=-1)
        normaliser = torch.cat([one, *([x] if self.normaliser_linear else []), *quadratic], dim=-1)
        return numerator, normaliser, torch.zeros_like(x[..., 0])


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

    # -- building (differentiable: the learned kernel trains through it) ----------------------
    def build(self, keys, values, assignment, num_clusters: int) -> ClusterState:
        """Summarise the tokens of each cluster (assignment -1: not part of the state)."""
        batch, kv_heads, _, head_dim = keys.shape
        keys, values = keys.float(), values.float()
        one_hot = one_hot_assignment(assignment, num_clusters)
        self.counts = one_hot.sum(dim=-1)
        if self.centred:
            self.means = (one_hot @ keys) / self.counts.clamp_min(1)[..., None]
        else:
            self.means = keys.new_zeros(batch, kv_heads, num_clusters, head_dim)
        numerator_size, normaliser_size = self.features.sizes(self.rank or head_dim)
        self.numerator = keys.new_zeros(batch, kv_heads, num_clusters, numerator_size, head_dim)
        self.normaliser = keys.new_zeros(batch, kv_heads, num_clusters, normaliser_size)
        if self.rank:
            self.projection = keys.new_zeros(batch, kv_heads, num_clusters, head_dim, self.rank)
        for cluster in range(num_clusters):
            weight = one_hot[:, :, cluster, :, None]  # (batch, kv_heads, n, 1)
            deltas = keys - self.means[:, :, cluster, None, :]
            if self.rank:
                self.projection[:, :, cluster] = principal_directions(deltas * weight.sqrt(), self.rank)
            self._accumulate(cluster, deltas, values, weight)
        if self.clamp:
            present = (assignment >= 0)[..., None]
            # with nothing folded yet the range is [0, 0]; the first decode token replaces it
            self.value_min = torch.nan_to_num(values.masked_fill(~present, math.inf).amin(dim=-2), posinf=0.0)
            self.value_max = torch.nan_to_num(values.masked_fill(~present, -math.inf).amax(dim=-2), neginf=0.0)
        return self

    def _accumulate(self, cluster: int, deltas, values, weight) -> None:
        if self.rank:
            deltas = deltas @ self.projection[:, :, cluster]
        numerator_features, normaliser_features, _ = self.features(deltas, self.layer_idx, "key")
        self.normaliser[:, :, cluster] += (normaliser_features * weight).sum(dim=-2)
        self.numerator[:, :, cluster] += (numerator_features * weight).transpose(-1, -2) @ values

    def fold(self, keys, values, weights=None) -> None:
        """Add decode tokens (the ratchet): each joins its nearest cluster, around that cluster's μ."""
        keys, values = keys.float(), values.float()
        for token in range(keys.shape[-2]):
            key, value = keys[:, :, token : token + 1], values[:, :, token : token + 1]
            if self.centred:
                target = nearest_cluster(self.means, self.counts, key)[..., 0]  # (batch, kv_heads)
                starts = self.counts.gather(-1, target[..., None])[..., 0] == 0
                index = target[..., None, None].expand(-1, -1, 1, key.shape[-1])
                # a token starting an empty cluster is its centre (its projection stays 0: δ = 0 anyway)
                self.means.scatter_(2, index, torch.where(starts[..., None, None], key, self.means.gather(2, index)))
            else:
                target = torch.zeros(key.shape[:2], dtype=torch.long, device=key.device)
            for cluster in range(self.counts.shape[-1]):
                weight = (target == cluster).float()[:, :, None, None]
                if bool(weight.any()):
                    self._accumulate(cluster, key - self.means[:, :, cluster, None, :], value, weight)
            if self.clamp:
                first = (self.counts.sum(dim=-1) == 0)[..., None]
                self.value_min = torch.where(first, value[:, :, 0], torch.minimum(self.value_min, value[:, :, 0]))
                self.value_max = torch.where(first, value[:, :, 0], torch.maximum(self.value_max, value[:, :, 0]))
            self.counts.scatter_add_(-1, target[..., None], torch.ones_like(self.counts[..., :1]))

    # -- reading ------------------------------------------------------------------------------
    def read(self, queries, scaling: float):
        """queries (batch, kv_heads, m, d) -> log_mass (batch, kv_heads, m), mean_value (..., m, d)."""
        x = queries.float() * scaling
        logits = x @ self.means.transpose(-1, -2)  # (batch, kv_heads, m, clusters)
        if self.rank:
            projected = torch.einsum("bhmd,bhcdr->bhmcr", x, self.projection)
        else:
            projected = x[:, :, :, None, :].expand(-1, -1, -1, self.counts.shape[-1], -1)
        numerator_features, normaliser_features, log_scale = self.features(projected, self.layer_idx, "query")
        normaliser = (normaliser_features * self.normaliser[:, :, None]).sum(dim=-1)
        numerator = torch.einsum("bhmcf,bhcfd->bhmcd", numerator_features, self.numerator)
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

    def build(self, keys, values, assignment, num_clusters: int) -> "VarianceClusterState":
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
        head_dim = self.means.shape[-1]
        return self.counts.shape[-1] * (3 * head_dim + 1) / (2 * head_dim)


def cluster_state_size(features, head_dim: int, num_clusters: int, centred: bool = True, rank: int | None = None,
                       clamp: bool = False) -> float:
    """Token equivalents (a token = 2·head_dim numbers) of a `ClusterState`: per cluster μ, P,
    the size n, z and S; with clamp, the value range."""
    numerator_size, normaliser_size = features.sizes(rank or head_dim)
    per_cluster = (head_dim if centred else 0) + head_dim * (rank or 0) + 1 + normaliser_size + numerator_size * head_dim
    total = num_clusters * per_cluster + (2 * head_dim if clamp else 0)
    return total / (2 * head_dim)


def principal_directions(deltas, rank: int) -> torch.Tensor:
    """(batch, kv_heads, n, d) -> (batch, kv_heads, d, rank): the top eigenvectors of Σ δδᵀ."""
    covariance = deltas.transpose(-1, -2) @ deltas
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1)
