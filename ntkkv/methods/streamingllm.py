"""StreamingLLM: attention sinks (the first tokens) plus the most recent ones (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, SelectionInputs


@dataclass
class StreamingLLM(Method):
    """Keep the first (budget - window) real tokens and the last `window_size` tokens."""

    name = "streamingllm"
    pooled = False

    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        batch, kv_heads, n, _ = inputs.keys.shape
        window = min(self.window_size, n)
        # rank of each token among the sample's real tokens: earlier real tokens score higher
        real_rank = inputs.valid.long().cumsum(dim=-1)[:, : n - window]
        return (-real_rank.float())[:, None, :].expand(batch, kv_heads, n - window)
