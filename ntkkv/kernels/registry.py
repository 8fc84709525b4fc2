"""Kernels by name: what happens to the tokens a selection method evicts.

A kernel is orthogonal to the selection method. Memory is the rule: a layer's budget
(`max_capacity_prompt`) is its whole memory per KV head in token equivalents (one token =
one key + one value), and the kernel's summary of the evicted tokens is paid out of it:
`plan(budget, head_dim)` says how many tokens stay exact and how many clusters the rest get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .clusters import (CLUSTER_BY, ClusterState, TaylorFeatures, VarianceClusterState, assign_clusters,
                       calibrated_slots, cluster_state_size, fold_into_merged_slots, merged_slots)

DEFAULT_STATE_BUDGET = 0.125


@dataclass(frozen=True)
class KernelPlan:
    """kept: exact tokens; clusters: summaries of evicted tokens; state_tokens: their memory."""

    kept: int
    clusters: int
    state_tokens: float


@dataclass
class Summary:
    """What a kernel makes of a layer's evicted tokens: merged slots that the cache holds like
    tokens (keys, values, bias; or None) and/or a state read through the kernel."""

    slot_keys: torch.Tensor | None = None
    slot_values: torch.Tensor | None = None
    slot_bias: torch.Tensor | None = None
    state: object | None = None


@dataclass
class ClusterKernel:
    """Base of the kernels that summarise clusters of evicted tokens.

    state_budget: the share of each layer's budget the summaries may use: a fraction (< 1) or
        a number of token equivalents (≥ 1); the rest stays exact tokens.
    cluster_by: "kmeans" (by key similarity) or "position" (contiguous runs).
    """

    state_budget: float = DEFAULT_STATE_BUDGET
    cluster_by: str = "kmeans"

    name: ClassVar[str] = ""
    max_clusters: ClassVar[int | None] = None

    def __post_init__(self):
        if not isinstance(self.state_budget, (int, float)) or isinstance(self.state_budget, bool) \
                or not self.state_budget > 0:
            raise ValueError(f"state_budget must be a fraction in (0, 1) or a number of tokens ≥ 1, "
                             f"got {self.state_budget!r}")
        if self.cluster_by not in CLUSTER_BY:
            raise ValueError(f"unknown cluster_by {self.cluster_by!r}; choose one of: {', '.join(CLUSTER_BY)}")

    def cluster_cost(self, head_dim: int) -> float:
        """Token equivalents of one cluster's summary."""
        raise NotImplementedError

    def fixed_cost(self, head_dim: int) -> float:
        return 0.0

    def check_model(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """Raise if this kernel cannot serve a model of this shape."""

    def fold_into_slots(self, layer, keys, values) -> None:
        """The ratchet for a layer without a state: kernels of merged slots fold the tokens in;
        the others (a layer that evicted plainly) drop them."""

    def plan(self, budget: int, head_dim: int, min_kept: int = 1) -> KernelPlan:
        """As many clusters as the state budget holds, leaving at least `min_kept` exact tokens.
        A layer whose share holds no cluster (PyramidKV's top layers) evicts plainly."""
        reserved = self.state_budget * budget if self.state_budget < 1 else float(self.state_budget)
        reserved = min(reserved, budget - min_kept)
        cost, fixed = self.cluster_cost(head_dim), self.fixed_cost(head_dim)
        clusters = max(math.floor((reserved - fixed) / cost + 1e-9), 0)
        if self.max_clusters is not None:
            clusters = min(clusters, self.max_clusters)
        if clusters == 0:
            return KernelPlan(budget, 0, 0.0)
        used = fixed + clusters * cost
        return KernelPlan(budget - math.ceil(used - 1e-9), clusters, used)

    def summarise(self, keys, values, evicted, plan: KernelPlan, layer_idx: int, window_queries=None,
                  scaling=None) -> Summary:
        """Summarise the evicted tokens (evicted: (batch, kv_heads, n) bool) of one layer; the
        observation window's queries (batch, kv_heads, group·window, d) come along for kernels that use them."""
        raise NotImplementedError


@dataclass
class MergeKernel(ClusterKernel):
    """Order 0: each cluster one merged slot (mean key, mean value, bias log n); 1 token each.

    calibrate: fit each slot's bias and value to the observation window's queries instead
        (`calibrated_slots`), at the same memory.
    """

    calibrate: bool = False

    name = "merge"

    def cluster_cost(self, head_dim):
        return 1.0

    def fold_into_slots(self, layer, keys, values):
        if layer.planned_clusters == 0:  # a layer whose share holds no slot evicts plainly
            return
        if layer.merged_slots == 0:  # nothing was evicted at the prefill: make the slots now
            layer.add_merged_slots(layer.planned_clusters)
        merged = layer.merged_slots
        fold_into_merged_slots(layer.keys[:, :, :merged], layer.values[:, :, :merged], layer.bias[:, :, :merged],
                               keys, values)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        if plan.clusters == 0:
            return Summary()
        assignment = assign_clusters(keys, evicted, plan.clusters, self.cluster_by)
        if self.calibrate and window_queries is not None:
            return Summary(*calibrated_slots(keys, values, assignment, plan.clusters, window_queries, scaling))
        return Summary(*merged_slots(keys, values, assignment, plan.clusters))


@dataclass
class VarianceKernel(ClusterKernel):
    """Order 0 plus the keys' variance in log space (`VarianceClusterState`): 1.5 tokens a cluster.

    variance_scale: γ, the share of the Gaussian second cumulant applied (1 = keys taken as
        Gaussian; 0 = a plain merged slot).
    """

    variance_scale: float = 0.5

    name = "merge_variance"

    def cluster_cost(self, head_dim):
        return (3 * head_dim + 1) / (2 * head_dim)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        if plan.clusters == 0:
            return Summary()
        assignment = assign_clusters(keys, evicted, plan.clusters, self.cluster_by)
        state = VarianceClusterState(self.variance_scale)
        return Summary(state=state.build(keys, values, assignment, plan.clusters))


@dataclass
class TaylorKernel(ClusterKernel):
    """Orders 1 and 2 of the expansion around each cluster's mean key (see `TaylorFeatures`).

    order: 1 or 2; pairs: "full" or "diag" quadratic term; rank: project each cluster's
    centred keys on their top `rank` principal directions first (None: no projection).
    """

    order: int = 2
    pairs: str = "full"
    rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.features = TaylorFeatures(self.order, self.pairs)
        self.name = f"taylor{self.order}" + ("" if self.order == 1 or self.pairs == "full" else "_diag") \
            + ("" if self.rank is None else "_lowrank")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1, rank=self._rank(head_dim))

    def _rank(self, head_dim):
        return None if self.rank is None else min(self.rank, head_dim)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        if plan.clusters == 0:
            return Summary()
        assignment = assign_clusters(keys, evicted, plan.clusters, self.cluster_by)
        state = ClusterState(self.features, layer_idx, rank=self._rank(keys.shape[-1]))
        return Summary(state=state.build(keys, values, assignment, plan.clusters))


@dataclass
class SeedKernel(ClusterKernel):
    """The seed prototype (ratchetkv): every evicted token in one uncentred state, the diagonal
    second-order Taylor map around k = 0 with the linear term in its normaliser, the normaliser
    floored and each value clipped to the range of the values folded in (its ratio clamp).
    Kept for reproduction: FACTS.md measures it far worse than evicting."""

    name = "ratchetkv"
    max_clusters = 1

    def __post_init__(self):
        super().__post_init__()
        self.features = TaylorFeatures(2, "diag", normaliser_linear=True)

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1, centred=False)

    def fixed_cost(self, head_dim):
        return 1.0  # the value range of the clamp: 2·d numbers

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        if plan.clusters == 0:
            return Summary()
        assignment = torch.where(evicted, 0, -1)
        state = ClusterState(self.features, layer_idx, centred=False, clamp=True)
        return Summary(state=state.build(keys, values, assignment, 1))


@dataclass
class LearnedKernel(ClusterKernel):
    """A learned feature map ("NTK") per layer and KV head, read from `kernel_path`
    (`train_kernel.py` writes it), applied around each cluster's mean key."""

    kernel_path: str | None = None

    name = "learned"

    def __post_init__(self):
        super().__post_init__()
        from .learned import LearnedFeatures

        if self.kernel_path is None:
            raise ValueError("kernel 'learned' needs kernel_path: a file written by train_kernel.py")
        self.features = LearnedFeatures.load(self.kernel_path).requires_grad_(False)

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1)

    def check_model(self, num_layers, kv_heads, head_dim):
        self.features.check_model(num_layers, kv_heads, head_dim)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None):
        if plan.clusters == 0:
            return Summary()
        assignment = assign_clusters(keys, evicted, plan.clusters, self.cluster_by)
        state = ClusterState(self.features, layer_idx)
        return Summary(state=state.build(keys, values, assignment, plan.clusters))


_REGISTRY = {
    "none": None,
    "merge": (MergeKernel, {}),
    "merge_calibrated": (MergeKernel, {"calibrate": True}),
    "merge_variance": (VarianceKernel, {}),
    "taylor1": (TaylorKernel, {"order": 1}),
    "taylor2": (TaylorKernel, {"order": 2, "pairs": "full"}),
    "taylor2_diag": (TaylorKernel, {"order": 2, "pairs": "diag"}),
    "taylor2_lowrank": (TaylorKernel, {"order": 2, "pairs": "full", "rank": 4}),
    "ratchetkv": (SeedKernel, {}),
    "learned": (LearnedKernel, {}),
}
KERNELS = tuple(_REGISTRY)


def build_kernel(kernel, state_budget=None, cluster_by=None, rank=None, kernel_path=None):
    """A kernel object by name (None for "none"); an object with `plan`/`summarise` passes through."""
    if kernel is None or not isinstance(kernel, str):
        return kernel
    name = kernel.lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    if _REGISTRY[name] is None:
        return None
    cls, preset = _REGISTRY[name]
    options = dict(preset)
    for field, value in (("state_budget", state_budget), ("cluster_by", cluster_by)):
        if value is not None:
            options[field] = value
    if rank is not None:
        if name != "taylor2_lowrank":
            raise ValueError(f"rank applies to kernel taylor2_lowrank, not {name!r}")
        options["rank"] = rank
    if kernel_path is not None:
        if name != "learned":
            raise ValueError(f"kernel_path applies to kernel learned, not {name!r}")
        options["kernel_path"] = kernel_path
    return cls(**options)
