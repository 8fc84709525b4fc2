"""The selection mechanics every policy shares: budgets, window, pooling, top-k.

A policy only says how much each earlier token is worth (`prefix_scores`); the base class
keeps the `window_size` last tokens, pools, never keeps padding and picks the top of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

POOLINGS = ("avgpool", "maxpool")
GQA_REDUCTIONS = ("mean", "max")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SelectionInputs:
    """What a policy sees of one layer at the end of the prefill.

    queries: (batch, kv_heads, group, n, head_dim) after RoPE, grouped by the KV head they read.
    keys, values: (batch, kv_heads, n, head_dim) after RoPE.
    valid: (batch, n) bool, False at left padding.
    scaling: the softmax scale (1/sqrt(head_dim) for these models).
    scores: (batch, kv_heads, n) float, token scores worked out before the layer is compressed (KVzip's
        reconstruction pass), or None: policies that score by themselves ignore it.
    reference_queries: (batch, kv_heads, m, d) queries a fitted summary fits to instead of the observation
        window's (KVzip's reconstruction queries), or None.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    scaling: float
    scores: torch.Tensor | None = None
    reference_queries: torch.Tensor | None = None


@dataclass
class Policy:
    """Base of every selection policy (a "method" in the CLIs: `--method snapkv`).

    max_capacity_prompt: memory per layer and KV head after the prefill, in token equivalents
        (one token = one key + one value): an int, or one int per layer. Prompts not longer than
        it are left whole. With a summary, the summary's memory is paid out of it.
    window_size: the last tokens, always kept; SnapKV's observation window.
    kernel_size: width of the pooling that smooths the scores (odd; the original's flag name).
    pooling: "avgpool" or "maxpool".
    gqa_reduce: how the scores of the query heads sharing a KV head are combined: "mean" or "max".
    max_capacity_prompt_ratio: instead of max_capacity_prompt, a share of each sample's own prompt
        length (round(ratio × real tokens), at least window_size + 1); max_capacity_prompt is then None.
    """

    max_capacity_prompt: int | Sequence[int] | None = 2048
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "maxpool"
    gqa_reduce: str = "mean"
    max_capacity_prompt_ratio: float | None = None

    name: ClassVar[str] = ""
    pooled: ClassVar[bool] = True  # whether kernel_size/pooling apply
    head_wise: ClassVar[bool] = False  # whether the KV heads of a layer keep different numbers of tokens

    def __post_init__(self):
        for field in ("window_size", "kernel_size"):
            value = getattr(self, field)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if self.gqa_reduce not in GQA_REDUCTIONS:
            raise ValueError(f"unknown gqa_reduce {self.gqa_reduce!r}; choose one of: {', '.join(GQA_REDUCTIONS)}")
        ratio = self.max_capacity_prompt_ratio
        if ratio is not None:
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
                raise ValueError(f"max_capacity_prompt_ratio must be a share of the prompt in (0, 1], got {ratio!r}")
            self.max_capacity_prompt = None
            return
        budgets = [self.max_capacity_prompt] if not isinstance(self.max_capacity_prompt, (list, tuple)) \
            else self.max_capacity_prompt
        for budget in budgets:
            if not is_int(budget) or budget <= self.window_size:
                raise ValueError(
                    f"max_capacity_prompt must be an integer larger than window_size={self.window_size} "
                    f"(or a list of one per layer), got {budget!r}"
                    + ("; for a share of the prompt use max_capacity_prompt_ratio" if isinstance(budget, float) else "")
                )

    # -- budgets -------------------------------------------------------------------------------
    def budget(self, prompt_length: int | None = None) -> int | list[int]:
        """max_capacity_prompt, or the ratio applied to a prompt of `prompt_length` real tokens."""
        if self.max_capacity_prompt_ratio is None:
            return list(self.max_capacity_prompt) if isinstance(self.max_capacity_prompt, (list, tuple)) \
                else self.max_capacity_prompt
        if prompt_length is None:
            raise ValueError("a ratio budget (max_capacity_prompt_ratio) needs the prompt length")
        return max(round(prompt_length * self.max_capacity_prompt_ratio), self.window_size + 1)

    def layer_budgets(self, num_layers: int, prompt_length: int | None = None) -> list[int]:
        """Memory per KV head of each layer, in token equivalents, for a prompt of `prompt_length`."""
        budget = self.budget(prompt_length)
        if isinstance(budget, int):
            return [budget] * num_layers
        if len(budget) != num_layers:
            raise ValueError(f"got {len(budget)} per-layer budgets for a model of {num_layers} layers")
        return budget

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        """Raise if this policy cannot serve a model of this shape (HeadKV's scores are per model)."""

    def min_exact(self) -> int:
        """The fewest exact tokens a layer may keep (more than the window)."""
        return self.window_size + 1

    def for_exact(self, exact_tokens: int) -> Policy:
        """The policy that selects `exact_tokens` (StreamingLLM adapts its window to a summary)."""
        return self

    # -- scoring -------------------------------------------------------------------------------
    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        """Scores (batch, kv_heads, n - window) of the tokens before the window; higher is kept."""
        raise NotImplementedError

    def reduce_group(self, scores: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, group, n) -> (batch, kv_heads, n)."""
        return scores.mean(dim=2) if self.gqa_reduce == "mean" else scores.amax(dim=2)

    def pool(self, scores: torch.Tensor) -> torch.Tensor:
        batch, heads, n = scores.shape
        flat = scores.reshape(batch * heads, 1, n)
        padding = self.kernel_size // 2
        if self.pooling == "avgpool":
            pooled = F.avg_pool1d(flat, self.kernel_size, stride=1, padding=padding)
        else:
            pooled = F.max_pool1d(flat, self.kernel_size, stride=1, padding=padding)
        return pooled[..., :n].reshape(batch, heads, n)

    # -- selection -----------------------------------------------------------------------------
    def selection_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        """Scores (batch, kv_heads, n - window) the top-k reads: `prefix_scores`, pooled, -inf at padding."""
        n = inputs.keys.shape[2]
        window = min(self.window_size, n)
        prefix_valid = inputs.valid[:, None, : n - window]
        scores = self.prefix_scores(inputs, layer_idx).float()
        scores = scores.masked_fill(~prefix_valid, 0.0)  # padding neither boosts nor hides a neighbour
        if self.pooled:
            scores = self.pool(scores)
        return scores.masked_fill(~prefix_valid, -math.inf)

    @torch.no_grad()
    def select(self, inputs: SelectionInputs, layer_idx: int, exact_tokens: int) -> torch.Tensor:
        """Indices (batch, kv_heads, exact_tokens) into the prompt, ascending, of the entries to keep.

        Padding is chosen only when a sample has fewer real tokens than the budget; the cache
        then masks it (bias -inf), so it is never attended to.
        """
        batch, kv_heads, n, _ = inputs.keys.shape
        window = min(self.window_size, n)
        scores = self.selection_scores(inputs, layer_idx)
        # a stable sort breaks ties (maxpool makes many) towards earlier tokens, wherever padding puts them
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., : exact_tokens - window]
        window_indices = torch.arange(n - window, n, device=top.device).expand(batch, kv_heads, window)
        return torch.cat([top, window_indices], dim=-1).sort(dim=-1).values

    def select_heads(self, inputs: SelectionInputs, layer_idx: int, exact_tokens: int):
        """(kept, padded): kept (batch, kv_heads, k) indices as `select` gives them, and padded (batch,
        kv_heads, k) bool or None. A head-wise policy gives its heads different counts: each head's
        row is its kept tokens ascending, with repeats of its first one in front as padding (`padded`
        True there; the cache gives them bias -inf and drops them when it packs the heads)."""
        return self.select(inputs, layer_idx, exact_tokens), None


def head_rows(chosen: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `select_heads` form of a head-wise choice: chosen (batch, kv_heads, n - window) bool marks the
    prefix tokens each head keeps; every head also keeps the `window` last tokens. Returns kept (batch,
    kv_heads, most) ascending per head, with repeats of the head's first kept token in front where it
    keeps fewer than the most, and padded (batch, kv_heads, most) True at those repeats."""
    batch, kv_heads, prefix = chosen.shape
    n = prefix + window
    kept_mask = torch.cat([chosen, chosen.new_ones(batch, kv_heads, window)], dim=-1)
    most = int(kept_mask.sum(dim=-1).max())
    positions = torch.arange(n, device=chosen.device).expand(batch, kv_heads, n)
    # not-kept positions sort first as -1; the last `most` entries are each head's kept tokens ascending
    rows = torch.where(kept_mask, positions, -1).sort(dim=-1).values[..., n - most:]
    padded = rows < 0
    first = torch.where(padded, n, rows).amin(dim=-1, keepdim=True)
    return torch.where(padded, first, rows), padded


def window_attention(inputs: SelectionInputs, window: int) -> torch.Tensor:
    """Softmax attention of the last `window` queries over all keys, causal, padding masked.

    Returns (batch, kv_heads, group, window, n) in float32.
    """
    n = inputs.keys.shape[2]
    window_queries = inputs.queries[:, :, :, n - window :].float()
    logits = torch.einsum("bhgqd,bhkd->bhgqk", window_queries, inputs.keys.float()) * inputs.scaling
    query_positions = torch.arange(n - window, n, device=logits.device)[:, None]
    allowed = torch.arange(n, device=logits.device)[None, :] <= query_positions
    allowed = allowed[None, None, None] & inputs.valid[:, None, None, None, :]
    return logits.masked_fill(~allowed, -math.inf).softmax(dim=-1)
