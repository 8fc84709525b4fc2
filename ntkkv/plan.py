"""Budgets worked out once: for each layer, the exact tokens and the summary's memory.

`max_capacity_prompt` is the memory per layer and KV head in token equivalents. The policy
splits it over layers (PyramidKV's ramp, a per-layer list); the summary, if any, takes its share
of each layer's memory for clusters; what is left stays exact tokens, of which the policy's
window is a part. `check_compression` does this against the model's shape before any weights
load, so that a bad budget stops a run with one line instead of a traceback after the load.
"""

from __future__ import annotations

import logging

from .policies import Policy
from .summaries import ClusterSummary, LayerPlan, Summary

logger = logging.getLogger(__name__)


def plan_layers(policy: Policy, summary: Summary | None, num_layers: int, head_dim: int,
                prompt_length: int | None = None) -> list[LayerPlan]:
    """Each layer's plan for a prompt of `prompt_length` tokens."""
    budgets = policy.layer_budgets(num_layers, prompt_length)
    if summary is None:
        return [LayerPlan(budget, budget) for budget in budgets]
    return [summary.plan(budget, head_dim, policy.min_exact()) for budget in budgets]


def check_compression(policy: Policy | None, summary: Summary | None, model_shape) -> None:
    """Raise a one-line ValueError if this policy and summary cannot run on a model of
    `model_shape` = (layers, kv_heads, head_dim); log the layers that evict plainly."""
    if policy is None:
        if summary is not None:
            raise ValueError(f"summary {summary.name!r} needs a compressing method; fullkv keeps every token")
        return
    num_layers, kv_heads, head_dim = model_shape
    policy.check_model(num_layers, kv_heads)
    if policy.head_wise and summary is not None and not summary.refits_kept:
        raise ValueError(f"summary {summary.name!r} makes merged slots or a state per KV head, which the head-wise "
                         f"method {policy.name!r} does not support; use a summary that refits the kept slots "
                         f"(cam, fitted) or none")
    if isinstance(policy.max_capacity_prompt, (list, tuple)) and len(policy.max_capacity_prompt) != num_layers:
        raise ValueError(f"max_capacity_prompt has {len(policy.max_capacity_prompt)} per-layer budgets; "
                         f"this model has {num_layers} layers")
    if summary is None:
        return
    summary.check_model(num_layers, kv_heads, head_dim)
    if policy.max_capacity_prompt_ratio is not None:
        return  # the budgets depend on each prompt; a layer too small for a cluster evicts plainly
    plans = plan_layers(policy, summary, num_layers, head_dim)
    if isinstance(summary, ClusterSummary):
        if not any(plan.clusters for plan in plans):
            raise ValueError(
                f"summary {summary.name!r}: no layer's state budget holds a cluster (one costs "
                f"{summary.cluster_cost(head_dim):.1f} tokens at head_dim {head_dim}, with more than "
                f"window_size={policy.window_size} tokens kept exact); raise state_budget or max_capacity_prompt")
        evicting = [layer for layer, plan in enumerate(plans) if plan.clusters == 0]
        if evicting:
            logger.info("summary %s: layers %s have too small a budget for a cluster and evict plainly",
                        summary.name, evicting)
