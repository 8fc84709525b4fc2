"""KVzip: keep what the model needs to repeat its context (Kim et al., 2025).

The model reads a request to repeat its context and then the context itself, over the full cache
(`ntkkv.reconstruction`); a cached token scores the most attention any of those queries, and any query
head of its KV head, gives it. No question is needed: the kept cache serves any later question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adakv import AdaKV, AdaPyramidKV
from .base import Policy, SelectionInputs, is_int
from .pyramidkv import PyramidKV

MISSING_SCORES = "kvzip needs its reconstruction pass: run through ntkkv.generate / the CLIs"


@dataclass
class KVzip(Policy):
    """Scores from context reconstruction, worked out before the layer is compressed (`SelectionInputs.scores`);
    the window's last tokens are kept as by every method.

    kernel_size: 1 (the default) leaves the scores unpooled, as in the paper; a wider kernel pools them as
        SnapKV does (`pooling`), so that a high-scoring token's neighbours are kept with it. The sinks count
        0 in the pooling and are marked kept after it, so their neighbours gain nothing from them.
    sinks: the first real tokens, always kept and never repeated; the reconstruction's softmax includes them.
    chunk_size: context tokens repeated per reconstruction forward (the paper's 2K); the pass's extra
        memory follows it, not the context's length.
    query_block: reconstruction queries scored at a time (None: about 2**26 attention weights a block).
    """

    kernel_size: int = 1
    sinks: int = 4
    chunk_size: int = 2048
    query_block: int | None = None

    name = "kvzip"

    def __post_init__(self):
        super().__post_init__()
        if not is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer ≥ 0, got {self.sinks!r}")
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.query_block is not None and (not is_int(self.query_block) or self.query_block < 1):
            raise ValueError(f"query_block must be a positive integer or None, got {self.query_block!r}")

    def prefix_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        if inputs.scores is None:
            raise ValueError(MISSING_SCORES)
        n = inputs.keys.shape[2]
        prefix = n - min(self.window_size, n)
        # a sink's own attention (large) would lift its neighbours in a pooling: it counts 0 until it is marked
        return inputs.scores[..., :prefix].float().masked_fill(self.sink_mask(inputs)[:, None, :prefix], 0.0)

    def sink_mask(self, inputs: SelectionInputs) -> torch.Tensor:
        """(batch, n) the first `sinks` real tokens of each sample."""
        return inputs.valid & (inputs.valid.long().cumsum(dim=-1) <= self.sinks)

    def pool(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.kernel_size == 1 else super().pool(scores)

    def selection_scores(self, inputs: SelectionInputs, layer_idx: int) -> torch.Tensor:
        scores = super().selection_scores(inputs, layer_idx)
        n = inputs.keys.shape[2]
        return scores.masked_fill(self.sink_mask(inputs)[:, None, : n - min(self.window_size, n)], math.inf)


@dataclass
class PyramidKVzip(KVzip, PyramidKV):
    """KVzip's scores with PyramidKV's budgets, falling from the bottom layer to the top (`beta`)."""

    name = "pyramid_kvzip"


@dataclass
class AdaKVzip(KVzip, AdaKV):
    """KVzip's scores, each layer's budget allocated across its KV heads as AdaKV does (the head-wise
    variant: a head the reconstruction barely needs gives its share to one that needs much)."""

    name = "ada_kvzip"


@dataclass
class AdaPyramidKVzip(KVzip, AdaPyramidKV):
    """KVzip's scores, PyramidKV's per-layer budgets, each layer's allocated across its KV heads as AdaKV does."""

    name = "ada_pyramid_kvzip"
