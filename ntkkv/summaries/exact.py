"""States that stand for evicted tokens without clusters: the exact one (a reference) and a
linear-attention state over one feature map. Both are test doubles and benchmark ceilings.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..ops import empty_part
from .base import LayerPlan, Summarised, Summary


class LinearState:
    """S = Σ w φ(k) vᵀ and z = Σ w φ(k), read as φ(q)·S / φ(q)·z. φ must give positive features."""

    def __init__(self, feature_map: Callable[[torch.Tensor, float], torch.Tensor]):
        self.feature_map = feature_map
        self.numerator = None  # (batch, kv_heads, features, d)
        self.normaliser = None  # (batch, kv_heads, features)

    def fold(self, keys, values, weights):
        features = self.feature_map(keys.float(), 1.0) * weights.float()[..., None]
        numerator = features.transpose(-1, -2) @ values.float()
        normaliser = features.sum(dim=-2)
        if self.numerator is None:
            self.numerator, self.normaliser = numerator, normaliser
        else:
            # in place: a captured decode step must update the tensors it was captured with
            self.numerator.add_(numerator)
            self.normaliser.add_(normaliser)

    def read(self, queries, scaling):
        if self.numerator is None:
            return empty_part(queries)
        features = self.feature_map(queries.float(), scaling)
        mass = features @ self.normaliser[..., None]
        mean_value = (features @ self.numerator) / mass.clamp_min(torch.finfo(torch.float32).tiny)
        return mass.squeeze(-1).log(), mean_value

    def size_in_tokens(self):
        if self.numerator is None:
            return 0.0
        features, d = self.numerator.shape[-2:]
        return (features * d + features) / (2 * d)


class ExactState:
    """Keeps the folded tokens themselves and computes Σ exp(s·q·k) v exactly.

    The reference a summary approximates: merged with the kept slots it reproduces full
    attention. It saves no memory; it exists for tests and as the ceiling in benchmarks. It grows as
    tokens fold in, so a decode step that folds into it cannot be captured in a CUDA graph.
    """

    static_shape = False

    def __init__(self):
        self.keys = self.values = self.log_weights = None

    def fold(self, keys, values, weights):
        log_weights = weights.float().log()  # weight 0 -> -inf: not part of the state
        if self.keys is None:
            self.keys, self.values, self.log_weights = keys, values, log_weights
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
            self.log_weights = torch.cat([self.log_weights, log_weights], dim=-1)

    def read(self, queries, scaling):
        if self.keys is None:
            return empty_part(queries)
        logits = (queries.float() @ self.keys.float().transpose(-1, -2)) * scaling + self.log_weights[..., None, :]
        log_mass = logits.logsumexp(dim=-1)
        # an empty row (every weight 0) gives NaN here; its weight in the merge is 0 anyway
        mean_value = torch.nan_to_num(logits.softmax(dim=-1)) @ self.values.float()
        return log_mass, mean_value

    def size_in_tokens(self):
        return 0.0 if self.keys is None else float(self.keys.shape[-2])


class StateSummary(Summary):
    """A summary whose evicted tokens all fold into one state (`new_state`), no clusters."""

    def state_size(self, head_dim: int) -> float:
        return 0.0

    def plan(self, memory: int, head_dim: int, min_exact: int = 1) -> LayerPlan:
        size = self.state_size(head_dim)
        if memory - math.ceil(size) < min_exact:
            raise ValueError(f"summary {self.name!r}: its state ({size:.1f} tokens) leaves fewer than {min_exact} "
                             f"exact tokens in a budget of {memory}")
        return LayerPlan(memory, memory - math.ceil(size), 0, size)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summarised:
        state = self.new_state()
        state.fold(keys, values, evicted.float())
        return Summarised(state=state)


class Exact(StateSummary):
    """Keeps every evicted token in an `ExactState` (the exact exponential kernel): the ceiling of
    the benchmarks and the tests' reference. Its memory is not counted against the budget."""

    name = "exact"

    def new_state(self) -> ExactState:
        return ExactState()


class Linear(StateSummary):
    """One `LinearState` for all evicted tokens (uncentred) through a feature map φ(x, scaling)
    with φ(q, s)·φ(k, 1) ≈ exp(s·q·k); its F·d + F numbers come out of the budget."""

    name = "linear"

    def __init__(self, feature_map: Callable[[torch.Tensor, float], torch.Tensor]):
        self.feature_map = feature_map

    def state_size(self, head_dim):
        features = self.feature_map(torch.zeros(1, head_dim), 1.0).shape[-1]
        return (features * head_dim + features) / (2 * head_dim)

    def new_state(self) -> LinearState:
        return LinearState(self.feature_map)
