"""SnapKV: keep what the last `window_size` queries attend to (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, SelectionInputs, window_attention


@dataclass
class SnapKV(Policy):
    """Score of a token = attention it gets from the observation window, summed over the window."""

    name = "snapkv"

    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        n = inputs.keys.shape[2]
        window = min(self.window_size, n)
        attention = window_attention(inputs, window)[..., : n - window]
        return self.reduce_group(attention.sum(dim=3))
