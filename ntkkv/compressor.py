"""One layer's prompt K/V compressed by a policy and a summary, and the ratchet; no model knowledge.

`Compressor.compress_layer` is what the patched forward runs at the prefill, the learned map's
training and the fidelity benchmark use it as well: the policy picks the exact tokens of each KV
head, the summary turns the evicted rest into merged slots and/or a state, and the result is the
cache layer's contents (merged slots first, then the kept tokens in prompt order).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .plan import plan_layers
from .policies import Policy, SelectionInputs
from .summaries import LayerPlan, Summarised, Summary

logger = logging.getLogger(__name__)

@dataclass
class CompressedKV:
    """keys, values (batch, kv_heads, slots, d): merged slots, then kept tokens in prompt order;
    bias (batch, kv_heads, slots) float32: log n for a merged slot, 0 for a token, -inf for padding;
    state: the summary's state or None; merged_slots: how many slots come first; plan: the layer's;
    head_counts: (batch, kv_heads) slots each head really keeps when a head-wise policy gave the heads
    different budgets (the others are padding slots in front of each head's row, bias -inf, which the
    cache drops when it packs the heads), or None."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    state: object | None
    merged_slots: int
    plan: LayerPlan
    head_counts: torch.Tensor | None = None


def evicted_mask(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, n) bool: the real tokens not in `kept` (batch, kv_heads, k); valid (batch, n)."""
    evicted = valid[:, None, :].expand(kept.shape[0], kept.shape[1], valid.shape[-1]).clone()
    return evicted.scatter_(2, kept, False)


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (batch, kv_heads, n, d) at indices (batch, kv_heads, k) -> (batch, kv_heads, k, d)."""
    return tensor.gather(2, indices[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def assemble(keys, values, kept, kept_bias, summarised: Summarised, kept_values=None):
    """The held slots of one layer: the summary's merged slots first, then the kept tokens in prompt
    order (kept (batch, kv_heads, k) indices, kept_bias their bias; kept_values, if given, replace the
    gathered values: a refitting summary's). Returns (keys, values, bias, number of merged slots)."""
    kept_keys = gather_tokens(keys, kept)
    kept_values = gather_tokens(values, kept) if kept_values is None else kept_values
    if summarised.slot_keys is None:
        return kept_keys, kept_values, kept_bias, 0
    return (torch.cat([summarised.slot_keys, kept_keys], dim=-2),
            torch.cat([summarised.slot_values, kept_values], dim=-2),
            torch.cat([summarised.slot_bias, kept_bias], dim=-1), summarised.slot_keys.shape[-2])


@dataclass
class Compressor:
    """What the patched forward needs: the selection policy (None: keep every token, full KV through the
    same path), optionally a summary of the evicted tokens, and optionally the ratchet: the most
    generated tokens kept exact, older ones fold into the summary (or are dropped without one)."""

    policy: Policy | None
    summary: Summary | None = None
    ratchet: int | None = None

    def __post_init__(self):
        self._plans: dict = {}
        self._warned = False

    def _length_matters(self, num_layers: int) -> bool:
        """Only ratio budgets and PyramidKV's short-prompt fallback depend on the prompt's length."""
        return self.policy.max_capacity_prompt_ratio is not None or len(set(self.policy.layer_budgets(num_layers))) > 1

    def plans(self, num_layers: int, head_dim: int, prompt_length: int | None = None) -> list[LayerPlan]:
        """The layers' plans for a prompt of `prompt_length` tokens, worked out once per length class."""
        depends = self._length_matters(num_layers)
        key = (num_layers, head_dim, prompt_length if depends else None)
        if key not in self._plans:
            self._plans[key] = plan_layers(self.policy, self.summary, num_layers, head_dim,
                                           prompt_length if depends else None)
        return self._plans[key]

    @torch.no_grad()
    def compress_layer(self, queries, keys, values, valid, layer_idx: int, num_layers: int,
                       scaling: float, scores=None, reference_queries=None) -> CompressedKV:
        """queries (batch, heads, n, d), keys/values (batch, kv_heads, n, d) after RoPE; valid (batch, n)
        False at left padding; scores and reference_queries: see `SelectionInputs` (KVzip's)."""
        batch, kv_heads, n, head_dim = keys.shape
        bias = torch.zeros(batch, kv_heads, n, device=keys.device).masked_fill(~valid[:, None, :], -math.inf)
        if self.policy is None:
            return CompressedKV(keys, values, bias, None, 0, LayerPlan(n, n))
        grouped = queries.view(batch, kv_heads, -1, n, head_dim)
        inputs = SelectionInputs(grouped, keys, values, valid, scaling, scores, reference_queries)
        if not self._per_sample(valid, layer_idx, num_layers, head_dim):
            # a plan that depends on the prompt's length takes the longest real one, not the padded width
            length = int(valid.sum(dim=-1).max()) if self._length_matters(num_layers) else n
            plan = self.plans(num_layers, head_dim, length)[layer_idx]
            if n <= plan.exact:  # nothing to evict: the prompt stays whole (the summary may start a state)
                nothing = torch.zeros(batch, kv_heads, n, dtype=torch.bool, device=keys.device)
                summary = self._summarise(keys, values, nothing, plan, layer_idx)
                return CompressedKV(keys, values, bias, summary.state, 0, plan)
            kept, padded = self.policy.for_exact(plan.exact).select_heads(inputs, layer_idx, plan.exact)
        else:
            plan, kept, padded = self._select_per_sample(inputs, layer_idx, num_layers)
        window = min(self.policy.for_exact(plan.exact).window_size, n)
        window_queries = grouped[:, :, :, n - window:].reshape(batch, kv_heads, -1, head_dim)
        evicted = evicted_mask(kept, valid)  # a padding slot repeats a kept token: nothing more is kept
        summary = self._summarise(keys, values, evicted, plan, layer_idx, window_queries, scaling)
        # merged slots go first: generated tokens stay the last slots
        kept_bias = bias.gather(2, kept)
        if padded is not None:  # a sample or head keeping fewer than the most
            kept_bias = kept_bias.masked_fill(padded, -math.inf)
        kept_values = None
        if self.summary is not None and self.summary.refits:
            reference = inputs.reference_queries if inputs.reference_queries is not None else window_queries
            kept_values, kept_bias = self.summary.refit(keys, values, kept, kept_bias, evicted, reference, scaling,
                                                        layer_idx, state=summary.state)
        held_keys, held_values, held_bias, merged = assemble(keys, values, kept, kept_bias, summary, kept_values)
        head_counts = None
        if self.policy.head_wise:
            head_counts = (~padded).sum(dim=-1) if padded is not None else kept.new_full(kept.shape[:2], kept.shape[-1])
        return CompressedKV(held_keys, held_values, held_bias, summary.state, merged, plan, head_counts)

    def _per_sample(self, valid, layer_idx: int, num_layers: int, head_dim: int) -> bool:
        """Whether the samples of this batch get different plans from their own real lengths (ratio
        budgets; PyramidKV's uniform budget for a prompt shorter than its bottom layer's share)."""
        if not self._length_matters(num_layers):
            return False
        lengths = valid.sum(dim=-1).tolist()
        plans = {self.plans(num_layers, head_dim, int(length))[layer_idx] for length in lengths}
        if len(plans) == 1:
            return False
        if self.summary is not None and not self.summary.refits_kept and self.policy.max_capacity_prompt_ratio is None:
            if not self._warned:
                logger.warning("PyramidKV with a summary: prompts of this batch fall on both sides of the uniform "
                               "budget's threshold; the longest prompt decides for all (alone, a short prompt would "
                               "get the uniform budget)")
                self._warned = True
            return False
        return True

    def _select_per_sample(self, inputs: SelectionInputs, layer_idx: int, num_layers: int):
        """Budgets by each sample's own real length: each sample keeps its own exact tokens. Returns the plan,
        the kept indices (batch, kv_heads, most) and which of them are padding (a sample keeping
        fewer than the most repeats its first pick in front; the caller masks those slots)."""
        batch, kv_heads, n, head_dim = inputs.keys.shape
        lengths = inputs.valid.sum(dim=-1).tolist()
        plans = [self.plans(num_layers, head_dim, int(length))[layer_idx] for length in lengths]
        # a summary that makes slots or a state needs one plan for the batch; one that refits the kept slots does not
        if self.summary is not None and not self.summary.refits_kept \
                and len({(plan.exact, plan.clusters) for plan in plans}) > 1:
            raise ValueError("ratio budgets with a summary need every sample of a batch to get the same budget: "
                             "run one sample at a time (eval_batch_size 1)")
        selections = []
        for sample, plan in enumerate(plans):
            one = SelectionInputs(*(t[sample: sample + 1] for t in (inputs.queries, inputs.keys, inputs.values,
                                                                    inputs.valid)), inputs.scaling,
                                  *(None if t is None else t[sample: sample + 1]
                                    for t in (inputs.scores, inputs.reference_queries)))
            if plan.exact < n:
                selections.append(self.policy.for_exact(plan.exact).select_heads(one, layer_idx, plan.exact))
            else:
                selections.append((torch.arange(n, device=inputs.keys.device).expand(1, kv_heads, n), None))
        most = max(kept.shape[-1] for kept, _ in selections)
        rows, padded = [], torch.zeros(batch, kv_heads, most, dtype=torch.bool, device=inputs.keys.device)
        for sample, (kept, head_padded) in enumerate(selections):
            width = kept.shape[-1]
            rows.append(torch.cat([kept[..., :1].expand(-1, -1, most - width), kept], dim=-1))
            padded[sample, :, : most - width] = True
            if head_padded is not None:
                padded[sample, :, most - width:] = head_padded[0]
        return max(plans, key=lambda plan: plan.exact), torch.cat(rows), padded

    def _summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summarised:
        if self.summary is None:
            return Summarised()
        return self.summary.summarise(keys, values, evicted, plan, layer_idx, window_queries, scaling)
