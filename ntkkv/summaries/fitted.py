"""Fitted compaction (Attention Matching, Zweiger et al. 2026, arXiv 2602.16284): the kept slots
stand for the evicted tokens too, at zero extra memory.

The policy's kept keys stay. Against reference queries q_i (the observation window's, or KVzip's
reconstruction queries) let p_ij = exp(s·q_i·k_j) / Σ_t exp(s·q_i·k_t), token j's share of full
attention over every real prompt token t (the window's own later tokens included: no causal rule
among the reference queries), and y_i full attention's output. Two closed-form fits, fp32, batched
over samples and KV heads:

  mass    a weight w_j = exp(β_j) per kept slot with Σ_j p_ij·w_j ≈ 1 for every query (the kept slots
          carry the whole prompt's attention mass, not only their own): ridge least squares towards
          w = 1 (plain eviction), clamped positive. β joins the slot's bias, which every attention path adds.
  values  with x_i the softmax over the kept slots of s·q_i·k_j + β_j, values V' with x_i·V' ≈ y_i:
          ridge least squares towards the original values.

Per sample and KV head the fitted slots replace eviction's only where their error on the reference
queries is not larger, so on those queries it never does worse than eviction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import LayerPlan, Summarised, Summary

CHUNK_ELEMENTS = 1 << 26  # logits per chunk of reference queries: bounds the memory of many (KVzip's) queries


def reference_terms(queries, keys, values, real, kept, scaling: float):
    """For each reference query (batch, kv_heads, m, d), in float32: its logits at the kept slots (batch,
    kv_heads, m, k), the log-sum-exp of its logits over the real tokens (batch, kv_heads, m), and full
    attention's output over them (batch, kv_heads, m, d). real: (batch, kv_heads, n) bool."""
    batch, kv_heads, n, _ = keys.shape
    keys32, values32 = keys.float(), values.float()
    chunk = max(1, CHUNK_ELEMENTS // max(batch * kv_heads * n, 1))
    parts = []
    for start in range(0, queries.shape[2], chunk):
        logits = (queries[:, :, start: start + chunk].float() @ keys32.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~real[:, :, None], -math.inf)
        at_kept = logits.gather(-1, kept[:, :, None].expand(-1, -1, logits.shape[2], -1))
        parts.append((at_kept, logits.logsumexp(dim=-1), torch.softmax(logits, dim=-1) @ values32))
    return [torch.cat(part, dim=2) for part in zip(*parts)]


def ridge_step(design, residual, ridge: float, columns):
    """argmin_Δ ‖design·Δ − residual‖² + λ‖Δ‖², batched: design (..., m, k), residual (..., m, r) -> (..., k, r).

    λ = ridge × the mean eigenvalue of designᵀ·design over its `columns` (..., live columns), so the
    regularisation does not depend on the scale of the design. Solved through the smaller Gram
    matrix: k×k, or m×m when there are more columns than rows (then Δ = designᵀ (design·designᵀ + λI)⁻¹ residual).
    """
    m, k = design.shape[-2:]
    lam = ridge * design.square().sum(dim=(-2, -1)) / columns + torch.finfo(torch.float32).tiny
    lam = lam[..., None, None]
    if k <= m:
        gram = design.transpose(-1, -2) @ design + lam * torch.eye(k, device=design.device)
        return torch.linalg.solve(gram, design.transpose(-1, -2) @ residual)
    gram = design @ design.transpose(-1, -2) + lam * torch.eye(m, device=design.device)
    return design.transpose(-1, -2) @ torch.linalg.solve(gram, residual)


def squared_error(weights, kept_values, targets):
    """Σ over queries of ‖weights·kept_values − targets‖², per (batch, kv_heads)."""
    return (weights @ kept_values - targets).square().sum(dim=(-2, -1))


def fit_kept(keys, values, kept, kept_bias, evicted, queries, scaling: float, ridge: float, min_weight: float):
    """The fitted values (batch, kv_heads, k, d) in values' dtype and bias (batch, kv_heads, k) float32 of the
    kept slots; see the module's docstring and `Summary.refit` for the arguments."""
    live = kept_bias > -math.inf
    real = evicted | (torch.zeros_like(evicted, dtype=torch.float32).scatter_add(2, kept, live.float()) > 0)
    at_kept, log_total, targets = reference_terms(queries, keys, values, real, kept, scaling)
    at_kept = at_kept + kept_bias[:, :, None]
    columns = live.sum(dim=-1).clamp_min(1)

    shares = (at_kept - log_total[..., None]).exp()  # p_ij; 0 at padding slots
    missing = 1 - shares.sum(dim=-1, keepdim=True)  # each query's mass eviction loses
    weights = (1 + ridge_step(shares, missing, ridge, columns)[..., 0]).clamp_min(min_weight)
    mass_error = (shares @ weights[..., None] - 1).square().sum(dim=(-2, -1))
    # a clamp can make the mass fit worse than eviction's: keep w = 1 there
    weights = torch.where((mass_error <= missing.square().sum(dim=(-2, -1)))[..., None], weights, 1.0)
    log_weights = weights.log()

    kept_values = values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1])).float()
    attention = torch.softmax(at_kept + log_weights[:, :, None], dim=-1)
    residual = targets - attention @ kept_values
    fitted_values = (kept_values + ridge_step(attention, residual, ridge, columns)).to(values.dtype)

    fitted_error = squared_error(attention, fitted_values.float(), targets)
    evicting_error = squared_error(torch.softmax(at_kept, dim=-1), kept_values, targets)
    better = evicted.any(dim=-1) & (fitted_error <= evicting_error) & fitted_values.isfinite().all(dim=(-2, -1))
    values_out = torch.where(better[..., None, None], fitted_values, kept_values.to(values.dtype))
    bias_out = torch.where(better[..., None], kept_bias + log_weights, kept_bias)
    return values_out, bias_out


@dataclass
class Fitted(Summary):
    """Fitted compaction: the kept slots' bias and values fitted to reference queries so that they carry
    the evicted tokens' attention mass and output. Same slots as eviction: zero extra memory.

    ridge: the ridge of both least-squares fits, as a multiple of the mean eigenvalue of the design's
        Gram matrix; it pulls the fit towards eviction's slots and makes it solvable with fewer reference
        queries than kept slots.
    min_weight: the smallest fitted weight exp(β) of a slot (the mass fit is clamped there, keeping it positive).
    """

    ridge: float = 0.1
    min_weight: float = 1e-3

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

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx: int):
        return fit_kept(keys, values, kept, kept_bias, evicted, queries, scaling, self.ridge, self.min_weight)
