"""H2O: heavy hitters, the tokens that collect the most attention over the whole prompt (Zhang et al., 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops import h2o_scores
from .base import Policy, SelectionInputs


@dataclass
class H2O(Policy):
    """Score of a token = attention it receives from every query of the prompt, summed.

    query_block: queries processed at a time by the plain-torch path, so the n×n matrix is never
        held at once (None: as many as keep one block's scores near 2**26 floats). On CUDA two
        fused Triton passes (`ntkkv.ops.h2o_scores`) do the same without any n×n block.
    """

    query_block: int | None = None
    name = "h2o"

    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        batch, kv_heads, group, n, _ = inputs.queries.shape
        window = min(self.window_size, n)
        if h2o_scores.available(inputs.queries):
            totals = h2o_scores.heavy_hitter_scores(inputs.queries.flatten(1, 2), inputs.keys, inputs.valid,
                                                    inputs.scaling).view(batch, kv_heads, group, n)
        else:
            totals = self.blockwise_scores(inputs)
        return self.reduce_group(totals[..., : n - window])

    def blockwise_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        """(batch, kv_heads, group, n): the plain-torch reference, one block of queries at a time."""
        batch, kv_heads, group, n, _ = inputs.queries.shape
        keys_t = inputs.keys.transpose(-1, -2)
        key_positions = torch.arange(n, device=keys_t.device)
        totals = torch.zeros(batch, kv_heads, group, n, dtype=torch.float32, device=keys_t.device)
        block = self.query_block or max(16, 2**26 // (batch * kv_heads * group * n))
        for start in range(0, n, block):
            stop = min(start + block, n)
            logits = torch.matmul(inputs.queries[:, :, :, start:stop].float(), keys_t[:, :, None].float())
            allowed = key_positions[None, :] <= key_positions[start:stop, None]
            allowed = allowed[None] & inputs.valid[:, None, :]  # (batch, block, n)
            logits.mul_(inputs.scaling).masked_fill_(~allowed[:, None, None], -math.inf)
            weights = logits.softmax(dim=-1)
            # padded queries see nothing real (their rows are NaN): they must not vote
            real_queries = inputs.valid[:, None, None, start:stop, None]
            totals += torch.where(real_queries, weights, 0.0).sum(dim=3)
        return totals
