"""The compressed cache: per layer, kept K/V at KV-head granularity, a bias per slot, the
logical length, and an optional summary state for evicted tokens.

`CompressedLayer` is a transformers cache layer, so it lives inside any `DynamicCache`
(the attention forward swaps it in at the prefill); `CompressedCache` starts with one per layer.
The model reads `get_seq_length()` to place new tokens: it is the number of tokens seen,
not the number kept, so RoPE positions continue from the full prompt.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from .summaries.merge import fold_into_merged_slots


class CompressedLayer(CacheLayerMixin):
    """keys, values: (batch, kv_heads, slots, head_dim).
    bias: (batch, kv_heads, stored slots) float32 added to the attention logits: 0 for a token,
        -inf for padding, log n for a slot standing for n merged tokens. Slots appended after it
        (generated tokens) have bias 0 and are not written into it, to keep decode lean;
        `slot_bias()` gives the whole row.
    logical_length: tokens this layer has seen (prompt + generated).
    state: a summary state standing for evicted tokens (`ntkkv.summaries.SummaryState`), or None.
    merged_slots: the first slots stand for merged evicted tokens (bias log n), not for one token each.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.bias: torch.Tensor | None = None
        self.logical_length = 0
        self.state = None
        self.merged_slots = 0
        self.planned_clusters = 0  # clusters the summary's plan gave this layer at the prefill
        self.prefill_tokens: list[int] = []  # token slots each sample kept at the prefill
        self.selected = False  # True once a method has chosen what this layer keeps
        self.masked = False  # any slot with a non-zero bias; kept on the host so decode never syncs

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def store(self, compressed, logical_length: int) -> None:
        """Replace the contents with the prefill's compressed result (`ntkkv.compressor.CompressedKV`)."""
        self.lazy_initialization(compressed.keys, compressed.values)
        self.keys, self.values, self.bias = compressed.keys, compressed.values, compressed.bias.float()
        self.masked = bool((self.bias != 0).any())
        self.logical_length = logical_length
        self.state, self.merged_slots = compressed.state, compressed.merged_slots
        self.planned_clusters = compressed.plan.clusters
        self.selected = True
        self.prefill_tokens = self.real_slots_per_sample()

    def appended_slots(self) -> int:
        return self.num_slots() - self.bias.shape[-1]

    def pop_oldest_appended(self, count: int):
        """Remove the `count` oldest appended slots and return their keys and values (the ratchet)."""
        stored = self.bias.shape[-1]
        popped = self.keys[:, :, stored : stored + count], self.values[:, :, stored : stored + count]
        self.keys = torch.cat([self.keys[:, :, :stored], self.keys[:, :, stored + count :]], dim=-2)
        self.values = torch.cat([self.values[:, :, :stored], self.values[:, :, stored + count :]], dim=-2)
        return popped

    def apply_ratchet(self, window: int, merges_slots: bool) -> None:
        """Past `window` appended (generated) tokens, the oldest leave the exact slots: they fold into
        the summary state, or into the merged slots (`merges_slots`), or are dropped."""
        excess = self.appended_slots() - window
        if excess <= 0:
            return
        keys, values = self.pop_oldest_appended(excess)
        if self.state is not None:
            self.state.fold(keys, values, keys.new_ones(keys.shape[:3]))
        elif merges_slots:
            self.fold_into_merged_slots(keys, values)

    def fold_into_merged_slots(self, keys, values) -> None:
        """The ratchet for merged-slot summaries: each token joins its nearest merged slot (running means,
        bias log n). A layer planned without slots (too small a budget) drops the tokens."""
        if self.planned_clusters == 0:
            return
        if self.merged_slots == 0:  # nothing was evicted at the prefill: make the slots now
            self.add_merged_slots(self.planned_clusters)
        merged = self.merged_slots
        fold_into_merged_slots(self.keys[:, :, :merged], self.values[:, :, :merged], self.bias[:, :, :merged],
                               keys, values)

    def add_merged_slots(self, count: int) -> None:
        """Put `count` empty merged slots (bias -inf) in front, for the ratchet to fold into."""
        batch, kv_heads, _, head_dim = self.keys.shape
        empty = self.keys.new_zeros(batch, kv_heads, count, head_dim)
        self.keys, self.values = torch.cat([empty, self.keys], dim=-2), torch.cat([empty, self.values], dim=-2)
        self.bias = torch.cat([self.bias.new_full((batch, kv_heads, count), -math.inf), self.bias], dim=-1)
        self.merged_slots += count
        self.masked = True

    def state_tokens(self) -> float:
        """Memory per KV head, in token equivalents, of what stands for evicted tokens: merged
        slots and the summary state."""
        return self.merged_slots + (self.state.size_in_tokens() if self.state is not None else 0.0)

    def update(self, key_states, value_states, *args, **kwargs):
        """Append new tokens (bias 0) and return everything held."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self.bias = key_states.new_zeros(key_states.shape[:3], dtype=torch.float32)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.logical_length += key_states.shape[-2]
        return self.keys, self.values

    def slot_bias(self) -> torch.Tensor:
        """(batch, kv_heads, slots): the bias of every slot, appended ones included."""
        appended = self.num_slots() - self.bias.shape[-1]
        return torch.nn.functional.pad(self.bias, (0, appended)) if appended else self.bias

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the model builds its mask over logical positions; the patched forward uses `bias` instead
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def num_slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def real_slots_per_sample(self) -> list[int]:
        """Token slots of each sample that are not padding, the most over its KV heads (merged
        slots are counted by `state_tokens`, not here)."""
        if self.bias is None:
            return []
        tokens = self.bias[:, :, self.merged_slots :]
        return ((tokens > -math.inf).sum(dim=-1).amax(dim=-1) + self.appended_slots()).tolist()

    def reset(self) -> None:
        self.keys = self.values = self.bias = self.state = None
        self.logical_length = self.merged_slots = self.planned_clusters = 0
        self.prefill_tokens = []
        self.is_initialized = self.selected = self.masked = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            beam_idx = beam_idx.to(self.keys.device)
            self.keys = self.keys.index_select(0, beam_idx)
            self.values = self.values.index_select(0, beam_idx)
            self.bias = self.bias.index_select(0, beam_idx)
        if self.state is not None:
            raise NotImplementedError("beam search with a summary state is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.bias = self.bias.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values, self.bias = self.keys[indices], self.values[indices], self.bias[indices]


class CompressedCache(DynamicCache):
    """A DynamicCache whose layers are `CompressedLayer`s from the start."""

    def __init__(self, num_layers: int | None = None, config=None):
        super().__init__()
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.layers = [CompressedLayer() for _ in range(num_layers or 0)]


def ensure_compressed_layer(cache, layer_idx: int) -> CompressedLayer:
    """The `CompressedLayer` at `layer_idx` of any DynamicCache, swapped in if needed.

    An empty layer is replaced; a layer already holding full K/V (from an unpatched call) is
    carried over as uncompressed slots.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(CompressedLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, CompressedLayer):
        return layer
    compressed = CompressedLayer()
    held = layer.get_seq_length() if layer.is_initialized else 0
    if held:
        if layer.keys.shape[-2] != held:
            raise ValueError(f"cannot compress a cache layer of type {type(layer).__name__}")
        compressed.update(layer.keys, layer.values)
    cache.layers[layer_idx] = compressed
    return compressed


def kv_lengths(cache, per_sample: bool = False):
    """Token K/V entries each layer holds: list[int] per layer, or [sample][layer] without padding.
    Merged slots are not tokens: `state_sizes` counts them with the summary state.

    Works on a plain DynamicCache too (then nothing is compressed and padding is counted).
    """
    layers = list(cache.layers)
    if not per_sample:
        return [layer.num_slots() - layer.merged_slots if isinstance(layer, CompressedLayer)
                else layer.get_seq_length() for layer in layers]
    per_layer = []
    for layer in layers:
        if isinstance(layer, CompressedLayer):
            per_layer.append(layer.real_slots_per_sample())
        else:
            per_layer.append([layer.get_seq_length()] * (layer.keys.shape[0] if layer.is_initialized else 0))
    return [list(sample) for sample in zip(*per_layer)]


def state_sizes(cache) -> list[float]:
    """Per layer, the memory per KV head (token equivalents) of merged slots and summary state."""
    return [layer.state_tokens() if isinstance(layer, CompressedLayer) else 0.0 for layer in cache.layers]
