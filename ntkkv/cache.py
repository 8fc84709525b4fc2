"""The compressed cache: per layer, kept K/V at KV-head granularity, a bias per slot, the
logical length, and an optional summary state for evicted tokens.

`CompressedLayer` is a transformers cache layer, so it lives inside any `DynamicCache`
(the attention forward swaps it in at the prefill); `CompressedCache` starts with one per layer.
The model reads `get_seq_length()` to place new tokens: it is the number of tokens seen,
not the number kept, so RoPE positions continue from the full prompt.
"""

from __future__ import annotations

import copy
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
    if isinstance(cache, StaticCache):
        per_layer = [layer.token_slots(cache.written, per_sample) for layer in cache.layers]
        return [list(sample) for sample in zip(*per_layer)] if per_sample else per_layer
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
    if isinstance(cache, StaticCache):
        return [layer.state_tokens(cache.folded) for layer in cache.layers]
    return [layer.state_tokens() if isinstance(layer, CompressedLayer) else 0.0 for layer in cache.layers]


# -- the static cache: fixed capacity for captured decode ---------------------------------------

class StaticLayer:
    """One layer's fixed-capacity buffers for decode, built from a prefilled `CompressedLayer`.

    keys, values (batch, kv_heads, capacity, d) and bias (batch, kv_heads, capacity) float32 hold, in
    order, the merged slots, the prefill's kept tokens (both padded to the batch's most with bias -inf)
    and a region of `region` slots for new tokens, which start at bias -inf and are written in place
    at `prefill_slots + count % region` (`StaticCache.write_slots`). With the ratchet the region is its
    window, a ring: once full, the token a write replaces first folds into the summary state, or into
    the merged slots, or is dropped (`fold_oldest`).
    """

    def __init__(self, keys, values, bias, state, merged_slots: int, prefill_slots: int, region: int,
                 ratchet: bool, merges_slots: bool, planned_clusters: int, prefilled_merged: int | None = None):
        self.keys, self.values, self.bias = keys, values, bias
        self.state, self.merged_slots = state, merged_slots
        # merged slots the prefill made; the others were made empty for the ratchet to fold into
        self.prefilled_merged = merged_slots if prefilled_merged is None else prefilled_merged
        self.prefill_slots, self.region = prefill_slots, region
        self.ratchet, self.merges_slots, self.planned_clusters = ratchet, merges_slots, planned_clusters

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def fold_oldest(self, index: torch.Tensor) -> None:
        """The ring is full: the token at `index` (a one-element tensor), the oldest new token, leaves the
        exact slots before the write that replaces it: into the summary state, the merged slots, or gone."""
        oldest_keys, oldest_values = self.keys.index_select(2, index), self.values.index_select(2, index)
        if self.state is not None:
            self.state.fold(oldest_keys, oldest_values, oldest_keys.new_ones(oldest_keys.shape[:3]))
        elif self.merges_slots and self.merged_slots:
            merged = self.merged_slots
            fold_into_merged_slots(self.keys[:, :, :merged], self.values[:, :, :merged], self.bias[:, :, :merged],
                                   oldest_keys, oldest_values)

    def state_tokens(self, folded: bool = True) -> float:
        """Memory of what stands for evicted tokens, as the dynamic cache counts it: merged slots made
        empty for the ratchet count once it has folded into them (`folded`)."""
        merged = self.merged_slots if folded else self.prefilled_merged
        return merged + (self.state.size_in_tokens() if self.state is not None else 0.0)

    def token_slots(self, written: int, per_sample: bool = False):
        """Token slots in use (merged slots excluded): for the layer, or per sample without padding."""
        if not per_sample:
            return self.prefill_slots - self.merged_slots + min(written, self.region)
        kept = self.bias[:, :, self.merged_slots: self.prefill_slots]
        return ((kept > -math.inf).sum(dim=-1).amax(dim=-1) + min(written, self.region)).tolist()


class StaticCache:
    """The layers' `StaticLayer`s and the shared counters of a static decode.

    count: new tokens written so far (a device tensor, advanced inside the decode step); written: the
    same, known on the host (the driver advances it), which says when the ring is full and refuses
    to run past the capacity. folding: whether the step being run folds (set by the driver).
    """

    def __init__(self, layers: list[StaticLayer], written: int, ratchet: int | None):
        self.layers = layers
        self.written = written
        self.ratchet = ratchet
        device = layers[0].keys.device
        self.count = torch.tensor(written, dtype=torch.long, device=device)
        self.region = layers[0].region
        if any(layer.region != self.region for layer in layers):
            raise ValueError("every layer of a static cache has the same room for new tokens")
        self.prefill_slots = torch.tensor([layer.prefill_slots for layer in layers], dtype=torch.long, device=device)
        self.folding = False

    def write_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer, the slot the next token is written to and the slots in use after it ((layers,) each;
        computed on the device, once a step)."""
        return (self.prefill_slots + self.count % self.region,
                self.prefill_slots + torch.clamp(self.count + 1, max=self.region))

    @property
    def room(self) -> int:
        """New tokens it can still take (None-like large with the ratchet: the ring never fills up)."""
        return math.inf if self.ratchet is not None else min(layer.region for layer in self.layers) - self.written

    def before_step(self) -> None:
        """Host-side check and mode of the next step: refuse to overwrite, decide whether it folds."""
        if self.room <= 0:
            capacity = min(layer.region for layer in self.layers)
            raise ValueError(f"the static cache has room for {capacity} new tokens per layer and all are written; "
                             f"build it with more room (generate's max_new_tokens) or pass ratchet=W to fold old "
                             f"tokens into the summary")
        self.folding = self.ratchet is not None and self.written >= self.ratchet

    def after_step(self) -> None:
        self.written += 1

    @property
    def folded(self) -> bool:
        """Whether the ratchet has folded a token yet."""
        return self.ratchet is not None and self.written > self.ratchet

    @classmethod
    @torch.no_grad()
    def from_compressed(cls, caches, room: int, ratchet: int | None = None,
                        merges_slots: bool = False) -> StaticCache:
        """The static cache of one or more prefilled caches (batches, stacked in order), with room for
        `room` new tokens per layer, or a ring of `ratchet` slots. Each source layer is freed once copied."""
        caches = list(caches)
        num_layers = len(caches[0].layers)
        appended = {layer.appended_slots() for cache in caches for layer in cache.layers}
        if len(appended) != 1:
            raise ValueError(f"the prefilled caches hold different numbers of tokens after the prompt: {appended}")
        appended = appended.pop()
        region = ratchet if ratchet is not None else appended + room
        if ratchet is not None and appended > ratchet:
            raise ValueError(f"{appended} tokens after the prompt do not fit the ratchet's window of {ratchet}")
        layers = []
        for index in range(num_layers):
            sources = [cache.layers[index] for cache in caches]
            planned = max(source.planned_clusters for source in sources)
            merged = max(source.merged_slots for source in sources)
            if ratchet is not None and merges_slots and merged == 0:
                merged = planned  # the ratchet folds into merged slots: make them now, empty
            kept = max(source.bias.shape[-1] - source.merged_slots for source in sources)
            first = sources[0]
            batch = sum(source.keys.shape[0] for source in sources)
            kv_heads, head_dim = first.keys.shape[1], first.keys.shape[-1]
            capacity = merged + kept + region
            keys = first.keys.new_zeros(batch, kv_heads, capacity, head_dim)
            values = torch.zeros_like(keys)
            bias = first.keys.new_full((batch, kv_heads, capacity), -math.inf, dtype=torch.float32)
            row = 0
            for source in sources:
                rows = slice(row, row + source.keys.shape[0])
                m, stored = source.merged_slots, source.bias.shape[-1]
                # merged slots from the front; kept tokens right-aligned before the region; appended at its start
                kept_target = slice(merged + kept - (stored - m), merged + kept)
                spans = [(slice(0, m), slice(0, m)), (slice(m, stored), kept_target),
                         (slice(stored, stored + appended), slice(merged + kept, merged + kept + appended))]
                for source_span, target_span in spans:
                    keys[rows, :, target_span] = source.keys[:, :, source_span]
                    values[rows, :, target_span] = source.values[:, :, source_span]
                bias[rows, :, :m] = source.bias[:, :, :m]
                bias[rows, :, kept_target] = source.bias[:, :, m:]
                bias[rows, :, merged + kept: merged + kept + appended] = 0.0
                row += source.keys.shape[0]
            state = stack_states([source.state for source in sources])
            layers.append(StaticLayer(keys, values, bias, state, merged, merged + kept, region, ratchet is not None,
                                      merges_slots, planned, max(source.merged_slots for source in sources)))
            for source in sources:  # the dynamic copy goes as soon as the static one exists
                source.keys = source.values = source.bias = source.state = None
        return cls(layers, appended, ratchet)


def stack_states(states):
    """One summary state for a batch made of several: every tensor attribute concatenated on the batch
    dimension. None for layers without a state."""
    if all(state is None for state in states):
        return None
    if any(state is None for state in states) or len({type(state) for state in states}) > 1:
        raise ValueError("cannot stack the summary states of these batches: some layers have none or another kind")
    if len(states) == 1:
        return states[0]
    stacked = copy.copy(states[0])
    for name, value in vars(states[0]).items():
        if isinstance(value, torch.Tensor):
            parts = [getattr(state, name) for state in states]
            if len({part.shape[1:] for part in parts}) > 1:
                raise ValueError(f"cannot stack the summary states of these batches: their {name} differ in shape "
                                 f"({[tuple(part.shape) for part in parts]})")
            setattr(stacked, name, torch.cat(parts))
    return stacked
