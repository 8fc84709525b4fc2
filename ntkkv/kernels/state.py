"""The seam between eviction and kernel methods.

A state holds, per sample and KV head, what the evicted tokens contribute to attention. Read
with a query it returns the log of their total weight and their weighted mean value, so the
attention forward merges it with the softmax over kept slots through the log-sum-exp:

    out = (e^lse_kept · out_kept + e^log_mass · mean_state) / (e^lse_kept + e^log_mass)

A kernel is a factory of states (`new_state`); a state's memory is counted in tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .registry import KernelPlan, Summary


class KernelState(Protocol):
    def fold(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add tokens: keys/values (batch, kv_heads, n, d), weights (batch, kv_heads, n) (0 = not added)."""

    def read(self, queries: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (batch, kv_heads, m, d) -> log_mass (batch, kv_heads, m), mean_value (batch, kv_heads, m, d)."""

    def size_in_tokens(self) -> float:
        """Memory per KV head in token equivalents (one token = one key + one value)."""


def merge_attention(lse_kept, out_kept, log_mass, mean_state):
    """Combine two attention parts given as (log total weight, weighted mean value)."""
    top = torch.maximum(lse_kept, log_mass)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_kept = torch.exp(lse_kept - top)[..., None]
    weight_state = torch.exp(log_mass - top)[..., None]
    return (weight_kept * out_kept + weight_state * mean_state) / (weight_kept + weight_state)


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
            self.numerator, self.normaliser = self.numerator + numerator, self.normaliser + normaliser

    def read(self, queries, scaling):
        if self.numerator is None:
            empty = queries.new_full(queries.shape[:-1], -math.inf, dtype=torch.float32)
            return empty, torch.zeros_like(queries, dtype=torch.float32)
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

    The reference a kernel approximates: merged with the kept slots it reproduces full
    attention. It saves no memory; it exists for tests and as the ceiling in benchmarks.
    """

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
            empty = queries.new_full(queries.shape[:-1], -math.inf, dtype=torch.float32)
            return empty, torch.zeros_like(queries, dtype=torch.float32)
        logits = (queries.float() @ self.keys.float().transpose(-1, -2)) * scaling + self.log_weights[..., None, :]
        log_mass = logits.logsumexp(dim=-1)
        # an empty row (every weight 0) gives NaN here; its weight in the merge is 0 anyway
        mean_value = torch.nan_to_num(logits.softmax(dim=-1)) @ self.values.float()
        return log_mass, mean_value

    def size_in_tokens(self):
        return 0.0 if self.keys is None else float(self.keys.shape[-2])


class StateKernel:
    """A kernel whose evicted tokens all fold into one state (`new_state`)."""

    name = "state"

    def state_size(self, head_dim: int) -> float:
        return 0.0

    def plan(self, budget: int, head_dim: int, min_kept: int = 1) -> KernelPlan:
        size = self.state_size(head_dim)
        if budget - math.ceil(size) < min_kept:
            raise ValueError(f"kernel {self.name!r}: its state ({size:.1f} tokens) leaves fewer than {min_kept} "
                             f"exact tokens in a budget of {budget}")
        return KernelPlan(budget - math.ceil(size), 0, size)

    def check_model(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        pass

    def fold_into_slots(self, layer, keys, values) -> None:
        """Only reached by a layer without a state, which a state kernel never leaves: nothing to do."""

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summary:
        state = self.new_state()
        state.fold(keys, values, evicted.float())
        return Summary(state=state)


class ExactKernel(StateKernel):
    """Factory of `ExactState`s (the exact exponential kernel). A test double and the ceiling of
    the benchmarks: it keeps every evicted token, and its memory is not counted."""

    name = "exact"

    def new_state(self) -> ExactState:
        return ExactState()


class LinearKernel(StateKernel):
    """Factory of `LinearState`s for a feature map φ(x, scaling) with φ(q, s)·φ(k, 1) ≈ exp(s·q·k)
    (one state for all evicted tokens, uncentred); its F·d + F numbers come out of the budget."""

    name = "linear"

    def __init__(self, feature_map: Callable[[torch.Tensor, float], torch.Tensor]):
        self.feature_map = feature_map

    def state_size(self, head_dim):
        features = self.feature_map(torch.zeros(1, head_dim), 1.0).shape[-1]
        return (features * head_dim + features) / (2 * head_dim)

    def new_state(self) -> LinearState:
        return LinearState(self.feature_map)
