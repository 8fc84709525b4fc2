"""CaM (Cache Merging, Zhang et al., ICML 2024): each evicted token's value merged into the kept tokens
that follow it, at zero extra memory.

The rule (the paper's merge, at one eviction of the whole prompt): with Ā the attention share of each
real prompt token (softmax over the real tokens), averaged over the reference queries (the observation
window's, or KVzip's; no causal rule among them: the window's queries see its later tokens too), an
evicted token i spreads its value over the `merge_budget` (m) real kept tokens W_i that follow it in
the prompt (fewer at the end), with the merge probability p_i = min(1, Ā_i / mean_{j in W_i} Ā_j):

    v_j  +=  p_i · v_i / |W_i|      for every j in W_i.

The original draws a Bernoulli(p_i) mask and adds v_i / |W_i| where it is 1; here the default adds
its expectation p_i · v_i / |W_i| (deterministic, the same in a batch as alone); `sample=True` draws
the mask from a generator seeded by `seed` and the layer. Keys and biases stay: only values change.
The original evicts one token per step, so a value merged into a token travels on when that token is
evicted in turn; here one eviction of the prompt merges into kept tokens only (nothing travels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import LayerPlan, Summarised, Summary

CHUNK_ELEMENTS = 1 << 26  # logits per chunk of reference queries: many (KVzip's) queries in bounded memory


def attention_shares(keys, queries, real, scaling: float) -> torch.Tensor:
    """Ā (batch, kv_heads, n) float32: each real token's softmax attention from queries (batch, kv_heads,
    m, d), over the real tokens only (real (batch, kv_heads, n) bool), averaged over the m queries.
    No causal rule among the queries: the window's queries see its later tokens too."""
    batch, kv_heads, n, _ = keys.shape
    keys32 = keys.float().transpose(-1, -2)
    chunk = max(1, CHUNK_ELEMENTS // max(batch * kv_heads * n, 1))
    total = torch.zeros(batch, kv_heads, n, device=keys.device)
    for start in range(0, queries.shape[2], chunk):
        logits = (queries[:, :, start: start + chunk].float() @ keys32) * scaling
        total += logits.masked_fill(~real[:, :, None], -math.inf).softmax(dim=-1).sum(dim=2)
    return total / queries.shape[2]


def kept_tokens(kept, kept_bias, n: int) -> torch.Tensor:
    """(batch, kv_heads, n) bool: the tokens a real slot keeps (kept_bias -inf marks a padding slot)."""
    # a padding slot repeats a kept token: summed, not scattered, so that it cannot hide the real one
    counts = torch.zeros(*kept.shape[:2], n, device=kept.device)
    return counts.scatter_add_(2, kept, torch.isfinite(kept_bias).float()) > 0


def merge_probabilities(shares, kept, kept_bias, evicted, merge_budget: int):
    """For each token (batch, kv_heads, n): the merge probability p_i (0 unless evicted), how many
    real kept tokens precede it (the first of its targets, in the kept tokens' order) and how many
    targets it has, |W_i|. Also each kept slot's rank among the real kept tokens."""
    batch, kv_heads, n = shares.shape
    real_slot = torch.isfinite(kept_bias)
    kept_real = kept_tokens(kept, kept_bias, n)
    before = kept_real.long().cumsum(dim=-1) - kept_real.long()
    count = real_slot.sum(dim=-1, keepdim=True)
    width = (count - before).clamp(0, merge_budget)
    slot_rank = before.gather(2, kept)
    # the kept tokens' shares in prompt order, summed from the front (float64: differences of sums)
    ranked = torch.zeros(batch, kv_heads, kept.shape[-1], dtype=torch.float64, device=shares.device)
    ranked.scatter_add_(2, slot_rank, torch.where(real_slot, shares.gather(2, kept), 0.0).double())
    prefix = torch.nn.functional.pad(ranked.cumsum(dim=-1), (1, 0))
    window_mean = (prefix.gather(2, before + width) - prefix.gather(2, before)) / width.clamp_min(1)
    ratio = shares.double() / window_mean.clamp_min(torch.finfo(torch.float64).tiny)
    probability = torch.where(evicted & (width > 0), ratio.clamp(0.0, 1.0), 0.0)
    return probability.float(), before, width, slot_rank


def cam_values(values, kept, kept_bias, evicted, shares, merge_budget: int, generator=None) -> torch.Tensor:
    """The kept slots' values (batch, kv_heads, k, d), in values' dtype, with the evicted tokens merged in.

    values (batch, kv_heads, n, d); kept (batch, kv_heads, k) indices; kept_bias (batch, kv_heads, k):
    -inf marks a padding slot, which keeps its value and receives nothing; evicted (batch, kv_heads, n);
    shares Ā (batch, kv_heads, n). With a generator, each merge happens with probability p_i (a
    Bernoulli draw); without, each adds its expectation."""
    probability, before, width, slot_rank = merge_probabilities(shares, kept, kept_bias, evicted, merge_budget)
    if generator is not None:
        probability = torch.bernoulli(probability, generator=generator)
    coefficient = probability / width.clamp_min(1)
    batch, kv_heads, k = kept.shape
    d = values.shape[-1]
    # each gap between kept tokens (gap g: g real kept tokens before it) gathers its evicted tokens' share;
    # `before` never decreases along the prompt, so a gap is a run of tokens: its sum is a difference of
    # prefix sums (float64), which, unlike a scatter-add, gives the same bits on every run on a GPU
    gaps = torch.empty(batch, kv_heads, k + 1, d, device=values.device)
    gap_ids = torch.arange(k + 1, device=values.device).expand(batch, k + 1).contiguous()
    for head in range(kv_heads):  # one head at a time: the prefix sums are (batch, n, d) float64
        prefix = torch.nn.functional.pad((coefficient[:, head, :, None] * values[:, head].float()).double()
                                         .cumsum(dim=1), (0, 0, 1, 0))
        ends = torch.searchsorted(before[:, head].contiguous(), gap_ids, right=True)  # (batch, k + 1)
        starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))
        gaps[:, head] = (prefix.gather(1, ends[..., None].expand(-1, -1, d))
                         - prefix.gather(1, starts[..., None].expand(-1, -1, d))).float()
    # the kept token of rank r receives from the gaps r-m+1 .. r (each gap's first m kept tokens)
    received = gaps[:, :, :k].clone()
    for offset in range(1, min(merge_budget, k)):
        received[:, :, offset:] += gaps[:, :, : k - offset]
    kept_values = values.gather(2, kept[..., None].expand(-1, -1, -1, d))
    merged = kept_values.float() + received.gather(2, slot_rank[..., None].expand(-1, -1, -1, d))
    return torch.where(torch.isfinite(kept_bias)[..., None], merged.to(values.dtype), kept_values)


@dataclass
class CAM(Summary):
    """CaM: evicted tokens' values merged into the kept tokens that follow them (module docstring).
    Zero extra memory: every slot of the budget stays an exact token, whose value changes.

    merge_budget: m, how many kept tokens after an evicted token share its value.
    sample: draw each merge from Bernoulli(p) as the original does instead of adding its expectation
        p·v/m; the draws are seeded, so a run repeats, but depend on the batch's shape (a sample in a
        batch may draw differently than alone).
    seed: the draws' seed (with the layer's index), for sample=True.
    """

    merge_budget: int = 32
    sample: bool = False
    seed: int = 0

    name = "cam"
    refits_kept = True

    def __post_init__(self):
        if not isinstance(self.merge_budget, int) or isinstance(self.merge_budget, bool) or self.merge_budget < 1:
            raise ValueError(f"merge_budget must be a positive integer, got {self.merge_budget!r}")
        if not isinstance(self.sample, bool):
            raise ValueError(f"sample must be True or False, got {self.sample!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def plan(self, memory: int, head_dim: int, min_exact: int = 1) -> LayerPlan:
        return LayerPlan(memory, memory)

    def summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summarised:
        return Summarised()  # nothing beside the kept slots: `refit` rewrites their values

    def refit(self, keys, values, kept, kept_bias, evicted, queries, scaling, layer_idx: int, state=None):
        real = evicted | kept_tokens(kept, kept_bias, keys.shape[2])
        shares = attention_shares(keys, queries, real, scaling)
        generator = None
        if self.sample:
            generator = torch.Generator(device=values.device).manual_seed(self.seed * 1_000_003 + layer_idx)
        return cam_values(values, kept, kept_bias, evicted, shares, self.merge_budget, generator), kept_bias
