"""Merged slots: each cluster of evicted tokens becomes one slot the cache holds like a token.

exp(s·q·k) = exp(s·q·μ) · exp(s·q·δ) with δ = k − μ. Order 0 of the expansion around each
cluster's mean key μ is a slot with key μ, the mean value and a logit bias log n, so that its
weight n·exp(s·q·μ) stands for Σ exp(s·q·k). The model's own attention reads it, at one token's
memory. `calibrated_slots` fits the bias and value to the observation window's queries instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import ClusterSummary, Summarised
from .clusters import cluster_means, nearest_cluster, one_hot_assignment


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


@dataclass
class Merge(ClusterSummary):
    """Each cluster one merged slot (mean key, mean value, bias log n): 1 token of memory each.

    calibrate: fit each slot's bias and value to the observation window's queries instead
        (`calibrated_slots`), at the same memory ("merge_calibrated").
    """

    calibrate: bool = False

    name = "merge"
    merges_slots = True

    def cluster_cost(self, head_dim):
        return 1.0

    def summarise_clusters(self, keys, values, assignment, clusters, layer_idx, window_queries, scaling):
        if self.calibrate and window_queries is not None:
            return Summarised(*calibrated_slots(keys, values, assignment, clusters, window_queries, scaling))
        return Summarised(*merged_slots(keys, values, assignment, clusters))
