"""Attention in plain torch at KV-head granularity: the reference of every fused kernel.

Queries are grouped by the KV head they read: (batch, kv_heads, rows, d), the query heads of a
group stacked on the rows. Every function returns float32. Two attention parts, each given as
(log of its total weight, its weighted mean value), combine exactly through the log-sum-exp:

    out = (e^lse_a · out_a + e^lse_b · out_b) / (e^lse_a + e^lse_b)
"""

from __future__ import annotations

import math

import torch


def reference_attention(queries, keys, values, logit_bias, scaling):
    """Softmax attention with an additive logit bias; returns (log-sum-exp, output).

    queries (b, h_kv, m, d); keys, values (b, h_kv, slots, d); logit_bias broadcastable to
    (b, h_kv, m, slots). A row whose every logit is -inf gives an output of 0 and an lse of -inf.
    """
    logits = (queries.float() @ keys.float().transpose(-1, -2)) * scaling + logit_bias
    lse = logits.logsumexp(dim=-1)
    return lse, torch.nan_to_num(logits.softmax(dim=-1)) @ values.float()


def merge_attention(lse_a, out_a, lse_b, out_b):
    """Combine two attention parts given as (log total weight, weighted mean value)."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a = torch.exp(lse_a - top)[..., None]
    weight_b = torch.exp(lse_b - top)[..., None]
    return (weight_a * out_a + weight_b * out_b) / (weight_a + weight_b)


def slot_logit_bias(bias: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(batch, kv_heads, slots) -> (batch, kv_heads, queries, slots): the slot bias, causal among
    the `num_queries` newest slots (the queries' own tokens)."""
    slots = bias.shape[-1]
    query_slots = torch.arange(slots - num_queries, slots, device=bias.device)[:, None]
    future = torch.arange(slots, device=bias.device)[None, :] > query_slots
    return bias[:, :, None, :].masked_fill(future, -math.inf)


def empty_part(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention part of no weight: (lse -inf, output 0) for every query row."""
    return (queries.new_full(queries.shape[:-1], -math.inf, dtype=torch.float32),
            torch.zeros_like(queries, dtype=torch.float32))
