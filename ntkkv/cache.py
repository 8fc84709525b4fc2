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


class RaggedPrefix:
    """The prefill's kept tokens of a layer whose KV heads keep different numbers (head-wise policies),
    packed without padding: per sample, head after head in one run.

    keys, values (batch, width, d); bias (batch, width) float32 (-inf past a sample's last head);
    starts, counts (batch, kv_heads) long: head h of sample b holds slots [starts, starts + counts);
    most: the largest count (host side).
    """

    def __init__(self, keys, values, bias, starts, counts, most: int):
        self.keys, self.values, self.bias = keys, values, bias
        self.starts, self.counts, self.most = starts, counts, most

    @classmethod
    def pack(cls, keys, values, bias, head_counts) -> RaggedPrefix:
        """From the compressor's padded rows: keys, values (batch, kv_heads, k, d) and bias (batch, kv_heads, k),
        where head h of sample b keeps its last head_counts[b, h] slots (the ones in front are padding)."""
        batch, kv_heads, k, head_dim = keys.shape
        counts = head_counts.to(device=keys.device, dtype=torch.long)
        starts = counts.cumsum(dim=-1) - counts
        width = int(counts.sum(dim=-1).max())
        slot = torch.arange(k, device=keys.device)
        keep = slot >= (k - counts)[..., None]  # (batch, kv_heads, k)
        target = (starts[..., None] + slot - (k - counts)[..., None]).masked_fill(~keep, width)  # width: discarded
        target = target.flatten(1)
        packed_keys = keys.new_zeros(batch, width + 1, head_dim)
        packed_values = values.new_zeros(batch, width + 1, head_dim)
        packed_bias = bias.new_full((batch, width + 1), -math.inf, dtype=torch.float32)
        packed_keys.scatter_(1, target[..., None].expand(-1, -1, head_dim), keys.flatten(1, 2))
        packed_values.scatter_(1, target[..., None].expand(-1, -1, head_dim), values.flatten(1, 2))
        packed_bias.scatter_(1, target, bias.float().flatten(1))
        return cls(packed_keys[:, :width], packed_values[:, :width], packed_bias[:, :width], starts, counts,
                   int(counts.max()))

    def padded(self):
        """(keys, values (batch, kv_heads, most, d), bias (batch, kv_heads, most)): each head's slots padded to
        the largest count with bias -inf; a transient view for the plain-torch attention path."""
        batch, kv_heads = self.starts.shape
        slot = torch.arange(self.most, device=self.keys.device)
        inside = slot < self.counts[..., None]
        index = (self.starts[..., None] + slot).clamp(max=max(self.keys.shape[1] - 1, 0)).flatten(1)
        head_dim = self.keys.shape[-1]
        keys = self.keys.gather(1, index[..., None].expand(-1, -1, head_dim)).view(batch, kv_heads, self.most, -1)
        values = self.values.gather(1, index[..., None].expand(-1, -1, head_dim)).view(batch, kv_heads, self.most, -1)
        bias = self.bias.gather(1, index).view(batch, kv_heads, self.most).masked_fill(~inside, -math.inf)
        return keys, values, bias

    def real_tokens(self) -> torch.Tensor:
        """(batch,) slots holding a real token (bias > -inf)."""
        return (self.bias > -math.inf).sum(dim=-1)

    def select(self, indices) -> RaggedPrefix:
        """The samples at `indices` (a batch reorder, repeat or selection)."""
        return RaggedPrefix(self.keys[indices], self.values[indices], self.bias[indices], self.starts[indices],
                            self.counts[indices], self.most)


class CompressedLayer(CacheLayerMixin):
    """keys, values: (batch, kv_heads, slots, head_dim).
    bias: (batch, kv_heads, stored slots) float32 added to the attention logits: 0 for a token,
        -inf for padding, log n for a slot standing for n merged tokens. Slots appended after it
        (generated tokens) have bias 0 and are not written into it, to keep decode lean;
        `slot_bias()` gives the whole row.
    logical_length: tokens this layer has seen (prompt + generated).
    state: a summary state standing for evicted tokens (`ntkkv.summaries.SummaryState`), or None.
    merged_slots: the first slots stand for merged evicted tokens (bias log n), not for one token each.
    ragged: with a head-wise policy, the prefill's kept tokens packed per head (`RaggedPrefix`); `keys` and
        `values` then hold only the tokens appended after the prefill, the same number for every head.
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
        self.ragged: RaggedPrefix | None = None

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def store(self, compressed, logical_length: int) -> None:
        """Replace the contents with the prefill's compressed result (`ntkkv.compressor.CompressedKV`)."""
        self.lazy_initialization(compressed.keys, compressed.values)
        self.keys, self.values, self.bias = compressed.keys, compressed.values, compressed.bias.float()
        self.masked = bool((self.bias != 0).any())
        self.ragged = None
        if compressed.head_counts is not None:
            self.ragged = RaggedPrefix.pack(self.keys, self.values, self.bias, compressed.head_counts)
            # new empty tensors, not views: a view would keep the padded rows' storage alive
            batch, kv_heads, _, head_dim = self.keys.shape
            self.keys = self.keys.new_empty(batch, kv_heads, 0, head_dim)
            self.values = self.values.new_empty(batch, kv_heads, 0, head_dim)
            self.bias = self.bias.new_empty(batch, kv_heads, 0)
            self.masked = True
        self.logical_length = logical_length
        self.state, self.merged_slots = compressed.state, compressed.merged_slots
        self.planned_clusters = compressed.plan.clusters
        self.selected = True
        self.prefill_tokens = self.real_slots_per_sample()

    def appended_slots(self) -> int:
        return self.keys.shape[-2] - self.bias.shape[-1]

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
        appended = self.appended_slots()
        return torch.nn.functional.pad(self.bias, (0, appended)) if appended else self.bias

    def attention_inputs(self):
        """(keys, values, bias) over every slot for the plain attention path, (batch, kv_heads, slots, ·): the
        held tensors themselves, or with a ragged prefix a padded copy of it followed by the appended tokens."""
        if self.ragged is None:
            return self.keys, self.values, self.slot_bias()
        keys, values, bias = self.ragged.padded()
        return (torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2),
                torch.cat([bias, self.slot_bias()], dim=-1))

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the model builds its mask over logical positions; the patched forward uses `bias` instead
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def num_slots(self) -> int:
        """Slots held per KV head (with a ragged prefix: the packed slots shared out over the heads)."""
        if self.keys is None:
            return 0
        return self.keys.shape[-2] + (self.ragged_slots_per_head() if self.ragged is not None else 0)

    def ragged_slots_per_head(self) -> int:
        return math.ceil(self.ragged.keys.shape[1] / self.ragged.starts.shape[1])

    def real_slots_per_sample(self) -> list[int]:
        """Token slots of each sample that are not padding, the most over its KV heads (merged
        slots are counted by `state_tokens`, not here); with a ragged prefix, its real tokens shared out
        over the heads (rounded up): what they cost in memory."""
        if self.bias is None:
            return []
        if self.ragged is not None:
            heads = self.ragged.starts.shape[1]
            return [math.ceil(real / heads) + self.appended_slots() for real in self.ragged.real_tokens().tolist()]
        tokens = self.bias[:, :, self.merged_slots :]
        return ((tokens > -math.inf).sum(dim=-1).amax(dim=-1) + self.appended_slots()).tolist()

    def reset(self) -> None:
        self.keys = self.values = self.bias = self.state = self.ragged = None
        self.logical_length = self.merged_slots = self.planned_clusters = 0
        self.prefill_tokens = []
        self.is_initialized = self.selected = self.masked = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            beam_idx = beam_idx.to(self.keys.device)
            self.keys = self.keys.index_select(0, beam_idx)
            self.values = self.values.index_select(0, beam_idx)
            self.bias = self.bias.index_select(0, beam_idx)
        if self.ragged is not None:
            self.ragged = self.ragged.select(beam_idx.to(self.ragged.keys.device))
        if self.state is not None:
            raise NotImplementedError("beam search with a summary state is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.bias = self.bias.repeat_interleave(repeats, dim=0)
        if self.ragged is not None:
            rows = torch.arange(self.ragged.keys.shape[0], device=self.ragged.keys.device)
            self.ragged = self.ragged.select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values, self.bias = self.keys[indices], self.values[indices], self.bias[indices]
        if self.ragged is not None:
            self.ragged = self.ragged.select(indices)


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


class RaggedStaticLayer(StaticLayer):
    """A static layer whose KV heads keep different numbers of prefill tokens (head-wise policies).

    keys, values (batch, width, d) and bias (batch, width) hold, per sample, head after head, each head's
    kept tokens followed by its own region of `region` slots for new tokens: head h of sample b starts at
    head_starts[b, h] and keeps head_counts[b, h] tokens; its next token goes to head_starts + head_counts
    + count % region (`StaticCache.ragged_slots`). No head is padded to the largest: the memory is the
    heads' total, not kv_heads times the largest. Head-wise policies take no summary state, so a full
    ring simply overwrites its oldest token.
    """

    def __init__(self, keys, values, bias, head_starts, head_counts, region: int, ratchet: bool):
        super().__init__(keys, values, bias, None, 0, 0, region, ratchet, False, 0)
        self.head_starts, self.head_counts = head_starts, head_counts
        self.max_head_slots = int(head_counts.max()) + region

    def fold_oldest(self, index) -> None:
        """Nothing to fold into: the write replaces the oldest token."""

    def token_slots(self, written: int, per_sample: bool = False):
        """Token slots in use per KV head: the heads' kept tokens shared out over them (rounded up), plus new ones."""
        kv_heads = self.head_counts.shape[1]
        new = min(written, self.region)
        if not per_sample:
            return math.ceil(int(self.head_counts.sum(dim=-1).max()) / kv_heads) + new
        real = []
        for sample in range(self.bias.shape[0]):
            kept = torch.cat([self.bias[sample, start: start + count]
                              for start, count in zip(self.head_starts[sample].tolist(),
                                                      self.head_counts[sample].tolist())])
            real.append(math.ceil(int((kept > -math.inf).sum()) / kv_heads) + new)
        return real

    @classmethod
    def from_layers(cls, sources, region: int, ratchet: bool) -> RaggedStaticLayer:
        """The ragged static layer of prefilled `CompressedLayer`s (batches, stacked in order); a source
        whose heads kept the same number (a prompt too short to compress) is packed as such."""
        prefixes = []
        for source in sources:
            prefix = source.ragged
            if prefix is None:
                stored = source.bias.shape[-1]
                counts = torch.full(source.keys.shape[:2], stored, dtype=torch.long, device=source.keys.device)
                prefix = RaggedPrefix.pack(source.keys[:, :, :stored], source.values[:, :, :stored], source.bias,
                                           counts)
            prefixes.append(prefix)
        kv_heads, head_dim = prefixes[0].starts.shape[1], prefixes[0].keys.shape[-1]
        width = max(prefix.keys.shape[1] for prefix in prefixes) + kv_heads * region
        batch = sum(prefix.keys.shape[0] for prefix in prefixes)
        first = prefixes[0].keys
        keys = first.new_zeros(batch, width + 1, head_dim)  # the last column takes what no head reads
        values = torch.zeros_like(keys)
        bias = first.new_full((batch, width + 1), -math.inf, dtype=torch.float32)
        starts = torch.empty(batch, kv_heads, dtype=torch.long, device=first.device)
        counts = torch.empty_like(starts)
        row = 0
        for source, prefix in zip(sources, prefixes):
            rows = slice(row, row + prefix.keys.shape[0])
            head_starts = prefix.starts + torch.arange(kv_heads, device=first.device) * region
            # each packed slot moves by its head's rooms before it: head h's run starts h · region later;
            # slots past a sample's last head go to the column nobody reads (no padded copy is made)
            slot = torch.arange(prefix.keys.shape[1], device=first.device).expand(prefix.keys.shape[0], -1)
            head = torch.searchsorted((prefix.starts + prefix.counts).contiguous(), slot.contiguous(), right=True)
            target = torch.where(head < kv_heads, slot + head.clamp(max=kv_heads - 1) * region, width)
            for buffer, packed in ((keys, prefix.keys), (values, prefix.values)):  # in place: no copy of the layer
                buffer[rows].scatter_(1, target[..., None].expand(-1, -1, head_dim), packed)
            bias[rows].scatter_(1, target, prefix.bias)
            tail = source.keys.shape[-2] - source.bias.shape[-1]  # tokens appended after the prefill, every head
            if tail:
                appended = ((head_starts + prefix.counts)[..., None]
                            + torch.arange(tail, device=first.device)).flatten(1)  # (batch, kv_heads · tail)
                for buffer, held in ((keys, source.keys), (values, source.values)):
                    buffer[rows].scatter_(1, appended[..., None].expand(-1, -1, head_dim),
                                          held[:, :, held.shape[-2] - tail:].flatten(1, 2))
                bias[rows].scatter_(1, appended, 0.0)
            starts[rows], counts[rows] = head_starts, prefix.counts
            row += prefix.keys.shape[0]
        return cls(keys[:, :width], values[:, :width], bias[:, :width], starts, counts, region, ratchet)


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
        ragged = [layer for layer in layers if isinstance(layer, RaggedStaticLayer)]
        for index, layer in enumerate(ragged):
            layer.ragged_index = index
        self.ragged_tails = torch.stack([layer.head_starts + layer.head_counts for layer in ragged]) if ragged else None
        self.ragged_counts = torch.stack([layer.head_counts for layer in ragged]) if ragged else None

    def ragged_slots(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For the ragged layers, stacked (ragged layers, batch, kv_heads): the slot each head writes its next
        token to and the slots it reads after the write; (None, None) without ragged layers."""
        if self.ragged_tails is None:
            return None, None
        return (self.ragged_tails + self.count % self.region,
                self.ragged_counts + torch.clamp(self.count + 1, max=self.region))

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
            if any(source.ragged is not None for source in sources):
                layers.append(RaggedStaticLayer.from_layers(sources, region, ratchet is not None))
                for source in sources:
                    source.keys = source.values = source.bias = source.ragged = None
                continue
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
