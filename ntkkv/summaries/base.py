"""The one interface of every summary of evicted tokens: `plan`, `summarise`, and the state's `fold`.

A summary is orthogonal to the selection policy. Memory is the rule: a layer's budget
(`max_capacity_prompt`) is its whole memory per KV head in token equivalents (one token = one key
+ one value = 2·head_dim numbers), and the summary is paid out of it. `plan(memory, head_dim)`
says how many tokens stay exact and how many clusters the evicted rest gets; `summarise` turns
the evicted tokens of one layer into merged slots (held in the cache like tokens) and/or a state
(read through the log-sum-exp merge); the state's `fold` adds tokens later (the ratchet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from .clusters import CLUSTER_BY, assign_clusters
from .fit import DEFAULT_MIN_WEIGHT, DEFAULT_RIDGE, fit_kept
from .routing import DEFAULT_CONCENTRATION, DEFAULT_SPIKE_THRESHOLD, check_routing, routed_assignment

DEFAULT_STATE_BUDGET = 0.125


@dataclass(frozen=True)
class LayerPlan:
    """How one layer spends its memory per KV head (token equivalents).

    memory: the layer's budget; exact: tokens kept exactly; clusters: summaries of evicted
    tokens; summary_tokens: their memory. exact + ceil(summary_tokens) <= memory.
    """

    memory: int
    exact: int
    clusters: int = 0
    summary_tokens: float = 0.0


@dataclass
class Summarised:
    """What a summary makes of one layer's evicted tokens: merged slots that the cache holds like
    tokens (keys, values and bias, or None) and/or a state read through the log-sum-exp merge."""

    slot_keys: torch.Tensor | None = None
    slot_values: torch.Tensor | None = None
    slot_bias: torch.Tensor | None = None
    state: SummaryState | None = None


class SummaryState(Protocol):
    """Per sample and KV head, what evicted tokens contribute to attention. Read with queries it
    returns the log of their total weight and their weighted mean value."""

    def fold(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add tokens: keys/values (batch, kv_heads, n, d), weights (batch, kv_heads, n) (0 = not added).
        In place, with no host synchronisation: the static decode path captures it in a CUDA graph."""

    def read(self, queries: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (batch, kv_heads, m, d) -> log_mass (batch, kv_heads, m), mean_value (batch, kv_heads, m, d)."""

    def size_in_tokens(self) -> float:
        """Memory per KV head in token equivalents."""


class Summary:
    """Base of every summary. `merges_slots`: its output is merged slots, which the ratchet folds
    new tokens into (the others fold into their state). `refits_kept`: a summary at zero extra memory
    that rewrites the kept slots' values and bias to stand for the evicted tokens too (`refit`)
    instead of making slots or a state. `refits`: whether the compressor calls `refit` after `summarise`
    (the refitting summaries, and a cluster summary's state with `fit_kept`)."""

    name: ClassVar[str] = ""
    merges_slots: ClassVar[bool] = False
    refits_kept: ClassVar[bool] = False

    @property
    def refits(self) -> bool:
        return self.refits_kept

    def plan(self, memory: int, head_dim: int, min_exact: int = 1) -> LayerPlan:
        raise NotImplementedError

    def check_model(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """Raise if this summary cannot serve a model of this shape."""

    def summarise(self, keys, values, evicted, plan: LayerPlan, layer_idx: int, window_queries=None,
                  scaling=None) -> Summarised:
        """Summarise the evicted tokens (evicted: (batch, kv_heads, n) bool) of one layer. The
        observation window's queries (batch, kv_heads, group·window, d) come along for the
        summaries that fit to them."""
        raise NotImplementedError

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx: int, state=None):
        """For the summaries that `refits`: the kept slots' new values and bias.

        keys, values (batch, kv_heads, n, d): the layer's whole prompt; kept (batch, kv_heads, k) the
        kept tokens' indices, ascending; kept_bias (batch, kv_heads, k) float32 (0 a token, -inf a
        padding slot, which must stay -inf); evicted (batch, kv_heads, n) bool; queries (batch,
        kv_heads, m, d) the reference queries (the observation window's, or KVzip's reconstruction
        queries); scaling the softmax scale. Returns (values (batch, kv_heads, k, d) in values' dtype,
        bias (batch, kv_heads, k) float32)."""
        raise NotImplementedError


@dataclass
class ClusterSummary(Summary):
    """Base of the summaries of clusters of evicted tokens: the plan, and the clustering before
    `summarise_clusters`.

    state_budget: the share of each layer's memory the summary may use: a fraction (< 1) or a
        number of token equivalents (≥ 1); the rest stays exact tokens.
    cluster_by: "kmeans" (by key similarity) or "position" (contiguous runs).
    route: give the evicted tokens that hold much of the observation window's attention (spikes) a
        cluster of their own, and cluster only the diffuse rest (`ntkkv.summaries.routing`); same memory.
    spike_threshold: with route, a spike holds at least spike_threshold / clusters of the evicted
        tokens' attention (1: more than an average cluster's share); a positive number.
    concentration: with route, a head whose top `clusters` evicted tokens hold at least this share of
        it makes every cluster a singleton of them (it keeps tokens rather than clusters); in (0, 1].
    fit_kept: after the state is built, fit the kept slots' bias and values to the reference queries
        with the state in the sum (`ntkkv.summaries.fit`): the slots carry what the state misses.
        Summaries with a state only (not merge's slots); same memory. A layer whose share holds no
        cluster has no state and is left as plain eviction, unfitted.

    With route, a generated token that the ratchet folds still joins its nearest cluster, a spike's
    singleton included: merged slots and merge_variance move that cluster's mean (the spike is averaged
    with it), the centred states keep the spike's centre (the spike stays exact, the new token is read
    around it).
    """

    state_budget: float = DEFAULT_STATE_BUDGET
    cluster_by: str = "kmeans"
    # keyword-only: the subclasses' own fields keep their positions
    route: bool = field(default=False, kw_only=True)
    spike_threshold: float = field(default=DEFAULT_SPIKE_THRESHOLD, kw_only=True)
    concentration: float = field(default=DEFAULT_CONCENTRATION, kw_only=True)
    fit_kept: bool = field(default=False, kw_only=True)

    max_clusters: ClassVar[int | None] = None

    def __post_init__(self):
        if not isinstance(self.state_budget, (int, float)) or isinstance(self.state_budget, bool) \
                or not self.state_budget > 0:
            raise ValueError(f"state_budget must be a fraction in (0, 1) or a number of tokens ≥ 1, "
                             f"got {self.state_budget!r}")
        if self.cluster_by not in CLUSTER_BY:
            raise ValueError(f"unknown cluster_by {self.cluster_by!r}; choose one of: {', '.join(CLUSTER_BY)}")
        if not isinstance(self.route, bool):
            raise ValueError(f"route must be True or False, got {self.route!r}")
        check_routing(self.spike_threshold, self.concentration)
        if not isinstance(self.fit_kept, bool):
            raise ValueError(f"fit_kept must be True or False, got {self.fit_kept!r}")
        if self.fit_kept and self.merges_slots:
            raise ValueError(f"fit_kept fits the kept slots beside a state; summary {self.name!r} makes merged "
                             f"slots, not a state (use fitted for eviction + fit)")
        if self.route and type(self).assign is not ClusterSummary.assign:  # seed_taylor: one state around 0
            raise ValueError(f"route applies to the summaries clustered by cluster_by, not {self.name!r} "
                             f"(it makes its own clusters)")

    @property
    def refits(self) -> bool:
        return self.fit_kept

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx: int, state=None):
        if state is None:  # a layer whose share holds no cluster evicts plainly, as the plan says: no fit either
            return values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1])), kept_bias
        return fit_kept(keys, values, kept, kept_bias, evicted, queries, scaling, DEFAULT_RIDGE, DEFAULT_MIN_WEIGHT,
                        state)

    def cluster_cost(self, head_dim: int) -> float:
        """Token equivalents of one cluster's summary."""
        raise NotImplementedError

    def fixed_cost(self, head_dim: int) -> float:
        return 0.0

    def plan(self, memory: int, head_dim: int, min_exact: int = 1) -> LayerPlan:
        """As many clusters as the state budget holds, leaving at least `min_exact` exact tokens.
        A layer whose share holds no cluster (PyramidKV's top layers) evicts plainly."""
        reserved = self.state_budget * memory if self.state_budget < 1 else float(self.state_budget)
        reserved = min(reserved, memory - min_exact)
        cost, fixed = self.cluster_cost(head_dim), self.fixed_cost(head_dim)
        clusters = max(math.floor((reserved - fixed) / cost + 1e-9), 0)
        if self.max_clusters is not None:
            clusters = min(clusters, self.max_clusters)
        if clusters == 0:
            return LayerPlan(memory, memory)
        used = fixed + clusters * cost
        return LayerPlan(memory, memory - math.ceil(used - 1e-9), clusters, used)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summarised:
        if plan.clusters == 0:
            return Summarised()
        assignment = self.cluster(keys, evicted, plan.clusters, window_queries, scaling)
        return self.summarise_clusters(keys, values, assignment, plan.clusters, layer_idx, window_queries, scaling)

    def cluster(self, keys, evicted, clusters: int, window_queries=None, scaling=None) -> torch.Tensor:
        """The clusters `summarise` uses: `assign`, or with `route` the routed split, which needs the
        observation window's queries (batch, kv_heads, m, d) and the softmax scale."""
        if not self.route:
            return self.assign(keys, evicted, clusters)
        if window_queries is None or scaling is None:
            # a host synchronisation, on this path only: the prefill of a prompt that evicts nothing passes no queries
            if bool(evicted.any()):
                raise ValueError(f"summary {self.name!r} with route=True needs the observation window's queries "
                                 f"(window_queries) and scaling; got window_queries={type(window_queries).__name__}, "
                                 f"scaling={scaling!r}")
            return torch.full(evicted.shape, -1, dtype=torch.long, device=evicted.device)
        return routed_assignment(keys, evicted, clusters, window_queries, scaling, self.cluster_by,
                                 self.spike_threshold, self.concentration)

    def assign(self, keys, evicted, clusters: int) -> torch.Tensor:
        """Cluster index (batch, kv_heads, n) of each evicted token, -1 for the others."""
        return assign_clusters(keys, evicted, clusters, self.cluster_by)

    def summarise_clusters(self, keys, values, assignment, clusters: int, layer_idx: int, window_queries,
                           scaling) -> Summarised:
        raise NotImplementedError
