"""Routing: the evicted tokens that hold much of the observation window's attention (spikes) get a
cluster of their own; the other clusters summarise only the diffuse rest.

A cluster averages a needle away: a merged slot of a needle and 40 other tokens keeps neither. Per
sample and KV head, each evicted token's share p_i of the evicted attention mass is the softmax of
s·q·k over the evicted tokens alone, averaged over the window's queries (Σ p_i = 1). With C clusters:

- a spike is a token with p_i ≥ spike_threshold / C (more than an average cluster's share), at most
  C of them, highest first; each becomes a singleton cluster;
- if the top C evicted tokens hold at least `concentration` of the mass, all C clusters become
  singletons of them: the head keeps tokens rather than clusters;
- the other C − r clusters (r singletons, per sample and head) cluster the diffuse tokens as before.

The number of clusters, and so the memory, stays C. A singleton is exact for a merged slot (its key
and value, bias log 1 = 0), `merge_calibrated`, `merge_variance` (variance 0) and the centred Taylor
states (δ = 0, where the expansion is exact); a learned map reads it as φ_q(s·q)·φ_k(0), exact only as
far as the map has learned it (train it with routing on).
"""

from __future__ import annotations

import math

import torch

from .clusters import assign_clusters

DEFAULT_SPIKE_THRESHOLD = 1.0
DEFAULT_CONCENTRATION = 0.5
# the window-queries × tokens logits held at once while computing the shares
SHARE_CHUNK_ELEMENTS = 2**26


def check_routing(spike_threshold, concentration) -> None:
    """Raise a ValueError naming a bad routing threshold and its allowed range."""
    if not isinstance(spike_threshold, (int, float)) or isinstance(spike_threshold, bool) \
            or not 0 < spike_threshold < math.inf:
        raise ValueError(f"spike_threshold must be a positive number (a multiple of an average cluster's share), "
                         f"got {spike_threshold!r}")
    if not isinstance(concentration, (int, float)) or isinstance(concentration, bool) or not 0 < concentration <= 1:
        raise ValueError(f"concentration must be a share in (0, 1], got {concentration!r}")


def evicted_shares(keys, evicted, window_queries, scaling: float) -> torch.Tensor:
    """(batch, kv_heads, n) float32: each evicted token's share of the window queries' attention over the
    evicted tokens alone (softmax of s·q·k, averaged over the queries); 0 for the tokens not evicted.

    keys (batch, kv_heads, n, d), evicted (batch, kv_heads, n) bool, window_queries (batch, kv_heads, m, d).
    """
    batch, kv_heads, n, _ = keys.shape
    queries, keys = window_queries.float(), keys.float()
    chunk = max(1, SHARE_CHUNK_ELEMENTS // max(1, batch * kv_heads * n))
    total = keys.new_zeros(batch, kv_heads, n)
    for start in range(0, queries.shape[2], chunk):
        logits = (queries[:, :, start: start + chunk] @ keys.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~evicted[:, :, None], -math.inf)
        total += torch.nan_to_num(logits.softmax(dim=-1), nan=0.0).sum(dim=2)  # nothing evicted: no share
    return total / max(queries.shape[2], 1)


def singletons(shares, evicted, num_clusters: int, spike_threshold: float, concentration: float):
    """The tokens that get a cluster of their own, per sample and head: (order, chosen), both (batch,
    kv_heads, min(C, n)): order the token indices by descending share (ties by position), chosen True for
    those that are singletons, always a prefix of `order`."""
    ranked = shares.masked_fill(~evicted, -1.0)  # the tokens not evicted rank last
    top = min(num_clusters, shares.shape[-1])
    order = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :top]
    top_shares = ranked.gather(-1, order)
    candidate = top_shares >= 0
    concentrated = top_shares.clamp_min(0).sum(dim=-1, keepdim=True) >= concentration
    # a head that is not concentrated keeps at least one cluster for its diffuse tokens, whatever the
    # threshold: with all C clusters singletons, the rest would be dropped as by eviction
    below_all = torch.arange(top, device=shares.device) < num_clusters - 1
    spikes = candidate & (top_shares >= spike_threshold / num_clusters) & below_all
    return order, spikes | (candidate & concentrated)


def routed_assignment(keys, evicted, num_clusters: int, window_queries, scaling: float, by: str = "kmeans",
                      spike_threshold: float = DEFAULT_SPIKE_THRESHOLD,
                      concentration: float = DEFAULT_CONCENTRATION) -> torch.Tensor:
    """Cluster index (batch, kv_heads, n) of each evicted token, -1 for the others: the r singletons of a
    sample and head take clusters C − r .. C − 1 (highest share first), the diffuse tokens clusters
    0 .. C − r − 1 (`assign_clusters` with a per-head limit). Per sample, no host synchronisation."""
    shares = evicted_shares(keys, evicted, window_queries, scaling)
    order, chosen = singletons(shares, evicted, num_clusters, spike_threshold, concentration)
    count = chosen.sum(dim=-1, keepdim=True)  # r, (batch, kv_heads, 1)
    rank = torch.arange(order.shape[-1], device=keys.device)
    spike_cluster = torch.where(chosen, num_clusters - count + rank, -1)
    is_spike = torch.zeros_like(evicted).scatter(-1, order, chosen)
    spike_assignment = torch.full_like(evicted, -1, dtype=torch.long).scatter(-1, order, spike_cluster)
    diffuse = assign_clusters(keys, evicted & ~is_spike, num_clusters, by, limit=num_clusters - count[..., 0])
    return torch.where(is_spike, spike_assignment, diffuse)
