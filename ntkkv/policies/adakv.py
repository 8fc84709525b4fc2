"""AdaKV: a layer's budget shared among its KV heads by where the scores are (Feng et al., 2024).

Uniform SnapKV gives every head the same number of tokens. A head whose attention is concentrated
needs few; one whose attention is spread needs many. AdaKV ranks the prefix tokens of all KV heads of
a layer together and keeps the overall top, so the layer's total stays the budget and each head gets
what its scores ask for; a safeguard keeps at least `alpha_safeguard` of the even share in every head.
The heads then hold different numbers of tokens: the cache packs them without padding (ragged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import SelectionInputs, head_rows
from .pyramidkv import PyramidKV
from .snapkv import SnapKV


def adaptive_choice(scores: torch.Tensor, per_head: int, alpha_safeguard: float) -> torch.Tensor:
    """Which prefix tokens each head keeps: scores (batch, kv_heads, m), -inf for padding; every head's
    `ceil(alpha_safeguard · per_head)` best first, then the best of the rest over all heads together,
    until the layer holds kv_heads · per_head. Returns (batch, kv_heads, m) bool."""
    batch, kv_heads, m = scores.shape
    per_head = min(per_head, m)
    floor = min(math.ceil(alpha_safeguard * per_head), per_head)
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    forced = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :floor], True)
    # forced tokens rank above every other; ties (maxpool makes many) go to the earlier head and token
    ranked = torch.where(forced, math.inf, scores).flatten(1)
    top = ranked.sort(dim=-1, descending=True, stable=True).indices[:, : kv_heads * per_head]
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True).view(batch, kv_heads, m)


@dataclass
class AdaKV(SnapKV):
    """SnapKV's scores, the layer's budget allocated across KV heads (Ada-SnapKV).

    alpha_safeguard: the share of the even per-head budget every head keeps whatever its scores
        (KVCache-Factory's `floor`, kvpress's `alpha_safeguard`: 0.2).
    """

    alpha_safeguard: float = 0.2
    name = "adakv"
    head_wise = True

    def __post_init__(self):
        super().__post_init__()
        check_alpha(self.alpha_safeguard)

    def select_heads(self, inputs: SelectionInputs, layer_idx: int, exact_tokens: int):
        window = min(self.window_size, inputs.keys.shape[2])
        chosen = adaptive_choice(self.selection_scores(inputs, layer_idx), exact_tokens - window, self.alpha_safeguard)
        return head_rows(chosen, window)


@dataclass
class AdaPyramidKV(AdaKV, PyramidKV):
    """PyramidKV's per-layer budgets, each layer's allocated across KV heads as AdaKV does (Ada-PyramidKV)."""

    name = "ada_pyramidkv"


def check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha_safeguard must be a share in [0, 1], got {alpha!r}")
