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

Beside a cluster summary's state (`fit_kept=True` on a summary that keeps a state, such as
`learned`), the same two fits run with the state in the sum: the slots carry the mass the state
does not give back, and their values the part of the output it does not explain; the fit is kept
where it beats the kept slots and the state unfitted.
"""

from __future__ import annotations

import math

import torch

DEFAULT_RIDGE = 0.1
DEFAULT_MIN_WEIGHT = 1e-3
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


def fit_terms(at_kept, log_total, targets, kept_values, live, has_evicted, ridge: float, min_weight: float,
              state_log_mass=None, state_mean=None, value_dtype=torch.float32):
    """The two fits from the reference terms, differentiable (the learned map trains through them).

    at_kept (batch, kv_heads, m, k): each reference query's logits at the kept slots, their bias
    included; log_total (batch, kv_heads, m) and targets (batch, kv_heads, m, d): full attention's
    log-sum-exp and output; kept_values (batch, kv_heads, k, d) float32; live (batch, kv_heads, k):
    not a padding slot; has_evicted (batch, kv_heads): the head evicted something. With a summary's
    state beside the kept slots, state_log_mass (batch, kv_heads, m) and state_mean (batch, kv_heads,
    m, d) are what it gives each query: the slots are fitted to the part of the mass and output the
    state does not already account for, and the fit is kept where it beats kept slots + state unfitted.
    The fitted values are rounded to value_dtype (the cache's) before they are compared.
    Returns (values (batch, kv_heads, k, d) float32, log_weights (batch, kv_heads, k): the bias to add,
    better (batch, kv_heads): where the fit replaced the slots)."""
    columns = live.sum(dim=-1).clamp_min(1)
    with_state = state_log_mass is not None
    shares = (at_kept - log_total[..., None]).exp()  # p_ij; 0 at padding slots
    missing = 1 - shares.sum(dim=-1, keepdim=True)  # each query's mass eviction loses
    if with_state:
        # ... and the state does not give back (clamped: a state off by e^80 must not overflow the gradient)
        missing = missing - (state_log_mass - log_total).clamp_max(80.0).exp()[..., None]
    weights = (1 + ridge_step(shares, missing, ridge, columns)[..., 0]).clamp_min(min_weight)
    mass_error = (shares @ (weights - 1)[..., None] - missing).square().sum(dim=(-2, -1))
    # a clamp can make the mass fit worse than eviction's: keep w = 1 there
    weights = torch.where((mass_error <= missing.square().sum(dim=(-2, -1)))[..., None], weights,
                          torch.ones_like(weights))
    log_weights = weights.log()

    def read(logits, slot_values):
        """Attention over the kept slots (and the state): the weights on the slots and the output."""
        if not with_state:
            attention = torch.softmax(logits, dim=-1)
            return attention, attention @ slot_values
        attention = torch.softmax(torch.cat([logits, state_log_mass[..., None]], dim=-1), dim=-1)
        on_slots = attention[..., :-1]
        return on_slots, on_slots @ slot_values + attention[..., -1:] * state_mean

    attention, output = read(at_kept + log_weights[:, :, None], kept_values)
    fitted_values = (kept_values + ridge_step(attention, targets - output, ridge, columns)).to(value_dtype).float()
    fitted_error = (read(at_kept + log_weights[:, :, None], fitted_values)[1] - targets).square().sum(dim=(-2, -1))
    unfitted_error = (read(at_kept, kept_values)[1] - targets).square().sum(dim=(-2, -1))
    better = has_evicted & (fitted_error <= unfitted_error) & fitted_values.isfinite().all(dim=(-2, -1))
    values_out = torch.where(better[..., None, None], fitted_values, kept_values)
    return values_out, torch.where(better[..., None], log_weights, torch.zeros_like(log_weights)), better


def fit_kept(keys, values, kept, kept_bias, evicted, queries, scaling: float, ridge: float, min_weight: float,
             state=None):
    """The fitted values (batch, kv_heads, k, d) in values' dtype and bias (batch, kv_heads, k) float32 of the
    kept slots; see the module's docstring and `Summary.refit` for the arguments. state: a summary's state
    standing for the evicted tokens beside the kept slots (`fit_terms`), or None."""
    live = kept_bias > -math.inf
    real = evicted | (torch.zeros_like(evicted, dtype=torch.float32).scatter_add(2, kept, live.float()) > 0)
    at_kept, log_total, targets = reference_terms(queries, keys, values, real, kept, scaling)
    kept_values = values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1])).float()
    state_log_mass = state_mean = None
    if state is not None:
        state_log_mass, state_mean = state.read(queries, scaling)
        state_log_mass, state_mean = state_log_mass.float(), state_mean.float()
    fitted, log_weights, _ = fit_terms(at_kept + kept_bias[:, :, None], log_total, targets, kept_values, live,
                                       evicted.any(dim=-1), ridge, min_weight, state_log_mass, state_mean, values.dtype)
    return fitted.to(values.dtype), kept_bias + log_weights
