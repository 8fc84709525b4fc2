"""StreamingLLM: attention sinks (the first tokens) plus the most recent ones (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import Policy, SelectionInputs


@dataclass
class StreamingLLM(Policy):
    """Keep the first (budget - window) real tokens and the last `window_size` tokens.

    sinks: when set, the window is (exact tokens - sinks) at whatever number of exact tokens the
    layer keeps, so that a summary, paid out of the budget, shortens the window and not the sinks.
    """

    sinks: int | None = None

    name = "streamingllm"
    pooled = False

    def min_exact(self) -> int:
        return self.window_size + 1 if self.sinks is None else self.sinks + 1

    def for_exact(self, exact_tokens: int) -> StreamingLLM:
        if self.sinks is None or exact_tokens - self.sinks == self.window_size:
            return self
        return replace(self, window_size=max(exact_tokens - self.sinks, 1))

    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        batch, kv_heads, n, _ = inputs.keys.shape
        window = min(self.window_size, n)
        # rank of each token among the sample's real tokens: earlier real tokens score higher
        real_rank = inputs.valid.long().cumsum(dim=-1)[:, : n - window]
        return (-real_rank.float())[:, None, :].expand(batch, kv_heads, n - window)
