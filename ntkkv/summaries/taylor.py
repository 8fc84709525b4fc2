"""Taylor states: orders 1 and 2 of exp(s·q·δ) around each cluster's mean key, and the seed's
uncentred diagonal state.

Expanding around each cluster's mean is accurate because a cluster's keys sit near it;
expanding exp(s·q·k) around k = 0 (the seed prototype, `SeedTaylor`) is not, since evicted
scores are far from 0: it overestimates the evicted mass and swamps the kept tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import ClusterSummary, Summarised
from .cluster_state import ClusterState, cluster_state_size


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



@dataclass
class Taylor(ClusterSummary):
    """Orders 1 and 2 of the expansion around each cluster's mean key (see `TaylorFeatures`).

    order: 1 or 2; pairs: "full" or "diag" quadratic term; rank: project each cluster's centred
    keys on their top `rank` principal directions first (None: no projection).
    """

    order: int = 2
    pairs: str = "full"
    rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.features = TaylorFeatures(self.order, self.pairs)
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")
        self.name = f"taylor{self.order}" + ("" if self.order == 1 or self.pairs == "full" else "_diag") \
            + ("" if self.rank is None else "_lowrank")

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1, rank=self._rank(head_dim))

    def _rank(self, head_dim):
        return None if self.rank is None else min(self.rank, head_dim)

    def summarise_clusters(self, keys, values, assignment, clusters, layer_idx, window_queries, scaling):
        state = ClusterState(self.features, layer_idx, rank=self._rank(keys.shape[-1]))
        return Summarised(state=state.build(keys, values, assignment, clusters))


@dataclass
class SeedTaylor(ClusterSummary):
    """The seed prototype (the seed repo's "RatchetKV" state): every evicted token in one uncentred
    state, the diagonal second-order Taylor map around k = 0 with the linear term in its normaliser,
    the normaliser floored and each value clipped to the range of the values folded in. Kept to
    reproduce it: it is far worse than evicting."""

    name = "seed_taylor"
    max_clusters = 1

    def __post_init__(self):
        super().__post_init__()
        self.features = TaylorFeatures(2, "diag", normaliser_linear=True)

    def cluster_cost(self, head_dim):
        return cluster_state_size(self.features, head_dim, 1, centred=False)

    def fixed_cost(self, head_dim):
        return 1.0  # the value range of the clamp: 2·d numbers

    def assign(self, keys, evicted, clusters):
        return torch.where(evicted, 0, -1)  # one state, around 0

    def summarise_clusters(self, keys, values, assignment, clusters, layer_idx, window_queries, scaling):
        state = ClusterState(self.features, layer_idx, centred=False, clamp=True)
        return Summarised(state=state.build(keys, values, assignment, 1))
