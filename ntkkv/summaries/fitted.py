"""The `fitted` summary: fitted compaction (Attention Matching, Zweiger et al. 2026) of the kept
slots at zero extra memory; the fits themselves are in `ntkkv.summaries.fit`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import LayerPlan, Summarised, Summary
from .fit import DEFAULT_MIN_WEIGHT, DEFAULT_RIDGE, fit_kept


@dataclass
class Fitted(Summary):
    """Fitted compaction: the kept slots' bias and values fitted to reference queries so that they carry
    the evicted tokens' attention mass and output. Same slots as eviction: zero extra memory.

    ridge: the ridge of both least-squares fits, as a multiple of the mean eigenvalue of the design's
        Gram matrix; it pulls the fit towards eviction's slots and makes it solvable with fewer reference
        queries than kept slots.
    min_weight: the smallest fitted weight exp(β) of a slot (the mass fit is clamped there, keeping it positive).
    """

    ridge: float = DEFAULT_RIDGE
    min_weight: float = DEFAULT_MIN_WEIGHT

    name = "fitted"
    refits_kept = True

    def __post_init__(self):
        for field in ("ridge", "min_weight"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{field} must be a positive number, got {value!r}")

    def plan(self, memory: int, head_dim: int, min_exact: int = 1) -> LayerPlan:
        return LayerPlan(memory, memory)  # the fit rewrites kept slots: nothing to pay for

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summarised:
        return Summarised()

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx: int, state=None):
        return fit_kept(keys, values, kept, kept_bias, evicted, queries, scaling, self.ridge, self.min_weight)
