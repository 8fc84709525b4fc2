"""One attention forward for Llama, Mistral and Qwen2, every backend, every policy and summary.

Prefill (the layer's cache is empty): the model's own attention over the whole prompt, then the
module's `kv_compressor` (`ntkkv.compressor.Compressor`) keeps what each KV head keeps and
summarises the rest. Later calls: attend over the held slots plus the new tokens, with each
slot's bias as an additive mask; with a summary state, merge it in through the log-sum-exp.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import MethodType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import CompressedLayer, RaggedStaticLayer, StaticCache, ensure_compressed_layer
from .models import attention_modules
from .ops import merge_attention, reference_attention, slot_logit_bias
from .ops.decode_attention import HEAD_DIMS as FUSED_HEAD_DIMS
from .ops.decode_attention import merged_decode_attention
from .ops.decode_step import add_rms_norm, rotary_write, silu_mul

# cuDNN's sdpa builds a graph for every new key length (~40 ms on an H200, torch 2.11) and decode
# sees a new length every step; the others need no such set-up (benchmarks/decode_probe.py)
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def padding_mask(attention_mask, batch: int, n: int, device) -> torch.Tensor:
    """(batch, n) bool, False at padding, read off whatever mask the model built."""
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:  # flash_attention_2 gets the 2D padding mask itself
        return attention_mask[:, -n:].bool()
    allowed = attention_mask if attention_mask.dtype == torch.bool \
        else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, 0, -n:, -n:]
    # a token is real if it sees itself; some masks open padding rows fully, which also opens
    # the last key to them, which no real earlier token sees
    own = allowed.diagonal(dim1=-2, dim2=-1).clone()
    sees_last = allowed[..., :-1, -1]
    own[:, :-1] &= ~sees_last
    return own.expand(batch, n)


def attend_to_cache(module, queries, layer: CompressedLayer, interface, backend: str, **kwargs):
    """Attention of `queries` (batch, heads, m, d) over everything the layer holds."""
    batch, heads, num_queries, head_dim = queries.shape
    keys, values, bias = layer.attention_inputs()
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    masked = layer.masked
    if layer.state is None and not (backend == "flash_attention_2" and masked):
        mask = None
        if backend != "flash_attention_2" and masked:
            mask = slot_logit_bias(bias, num_queries).repeat_interleave(group, dim=1).to(queries.dtype)
        elif backend != "flash_attention_2" and num_queries > 1:
            # every bias is 0: one causal mask that every sample and head broadcasts, not one per head
            # (a reconstruction chunk over a long prompt would otherwise build gigabytes of it)
            mask = slot_logit_bias(bias[:1, :1], num_queries).to(queries.dtype)
        if backend == "sdpa" and queries.is_cuda:
            with sdpa_kernel(DECODE_SDPA_BACKENDS):
                return interface(module, queries, keys, values, mask, dropout=0.0, scaling=module.scaling, **kwargs)
        return interface(module, queries, keys, values, mask, dropout=0.0, scaling=module.scaling, **kwargs)
    grouped = queries.reshape(batch, kv_heads, group * num_queries, head_dim)
    output = merged_attention(grouped, keys, values, bias, layer.state, module.scaling, num_queries)
    output = output.view(batch, heads, num_queries, head_dim).transpose(1, 2).to(queries.dtype)
    return output, None


def merged_attention(grouped_queries, keys, values, bias, state, scaling: float, num_queries: int) -> torch.Tensor:
    """The general path, at KV-head granularity: softmax over the slots (keys, values (batch, kv_heads,
    slots, d)) with their biases (batch, kv_heads, slots), causal among the `num_queries` newest, merged with
    the summary state (or None) through the log-sum-exp.

    grouped_queries (batch, kv_heads, group * num_queries, d) -> float32 output of the same shape.
    """
    state = state.read(grouped_queries, scaling) if state is not None else (None, None)
    if num_queries == 1 and grouped_queries.is_cuda and grouped_queries.shape[-1] in FUSED_HEAD_DIMS:
        # decode: one fused Triton kernel for the softmax over the slots and the merge (plain torch below
        # is its reference)
        return merged_decode_attention(grouped_queries, keys, values, bias, scaling, *state)
    group = grouped_queries.shape[2] // num_queries
    logit_bias = slot_logit_bias(bias, num_queries).repeat(1, 1, group, 1)
    lse, output = reference_attention(grouped_queries, keys, values, logit_bias, scaling)
    if state[0] is not None:
        output = merge_attention(lse, output, *state)
    return output


def static_decode_layer(layer, hidden, residual, position_embeddings, cache: StaticCache, write_slots,
                        used_slots, ragged_write=None, ragged_used=None):
    """One decoder layer of a static decode step: Llama's, Mistral's and Qwen2's layer (pre-norm, attention,
    gated MLP) with the elementwise work fused (`ntkkv.ops.decode_step`). The new token's key and value are
    written in place at the layer's write slot, and its queries attend over every slot with its bias (-inf
    where unused), merged with the summary state if any. A ragged layer (head-wise budgets) writes and reads
    each head's own run (`ragged_write`, `ragged_used`: `StaticCache.ragged_slots`). hidden (batch, 1, width)
    and residual (None before the first layer) -> the layer's output and the residual stream."""
    attention, mlp = layer.self_attn, layer.mlp
    normed, residual = add_rms_norm(hidden, residual, layer.input_layernorm.weight,
                                    layer.input_layernorm.variance_epsilon)
    batch, head_dim = hidden.shape[0], attention.head_dim
    static = cache.layers[attention.layer_idx]
    ragged = isinstance(static, RaggedStaticLayer)
    if ragged:
        index, reads = ragged_write[static.ragged_index], {
            "head_starts": static.head_starts, "head_used": ragged_used[static.ragged_index],
            "max_head_slots": static.max_head_slots}
    else:
        index = write_slots[attention.layer_idx: attention.layer_idx + 1]
        reads = {"used_slots": used_slots[attention.layer_idx: attention.layer_idx + 1]}
    if cache.folding:
        static.fold_oldest(index)
    cos, sin = position_embeddings
    queries = rotary_write(attention.q_proj(normed).view(batch, -1, head_dim),
                           attention.k_proj(normed).view(batch, -1, head_dim),
                           attention.v_proj(normed).view(batch, -1, head_dim), cos[:, 0], sin[:, 0],
                           static.keys, static.values, static.bias, index)
    kv_heads = static.head_starts.shape[1] if ragged else static.keys.shape[1]
    grouped = queries.view(batch, kv_heads, -1, head_dim)
    state = static.state.read(grouped, attention.scaling) if static.state is not None else (None, None)
    output = merged_decode_attention(grouped, static.keys, static.values, static.bias, attention.scaling, *state,
                                     out_dtype=hidden.dtype, **reads)
    hidden = attention.o_proj(output.view(batch, 1, -1))
    normed, residual = add_rms_norm(hidden, residual, layer.post_attention_layernorm.weight,
                                    layer.post_attention_layernorm.variance_epsilon)
    if getattr(mlp.config, "hidden_act", None) in ("silu", "swish"):
        return mlp.down_proj(silu_mul(mlp.gate_proj(normed), mlp.up_proj(normed))), residual
    return mlp(normed), residual


def compressed_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                                 past_key_values=None, cache=None, **kwargs):
    """Replaces `LlamaAttention.forward` (and Mistral's, Qwen2's); `self.kv_compressor` is a `Compressor`."""
    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    model_module = sys.modules[type(self).__module__]
    queries, keys = model_module.apply_rotary_pos_emb(queries, keys, cos, sin)

    backend = self.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(backend, model_module.eager_attention_forward)
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    layer = ensure_compressed_layer(cache, self.layer_idx) if cache is not None else None
    compressor = self.kv_compressor
    if layer is None or layer.num_slots() == 0:
        output, weights = interface(self, queries, keys, values, attention_mask, dropout=0.0,
                                    scaling=self.scaling, sliding_window=sliding_window, **kwargs)
        if layer is not None:
            batch, _, n, _ = keys.shape
            valid = padding_mask(attention_mask, batch, n, keys.device)
            compressed = compressor.compress_layer(queries, keys, values, valid, self.layer_idx,
                                                   self.config.num_hidden_layers, self.scaling)
            layer.store(compressed, n)
    else:
        layer.update(keys, values)
        if compressor.ratchet is not None:
            summary = compressor.summary
            layer.apply_ratchet(compressor.ratchet, summary is not None and summary.merges_slots)
        output, weights = attend_to_cache(self, queries, layer, interface, backend, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(output), weights


@contextmanager
def patched(model, compressor):
    """The model's attention modules run `compressed_attention_forward` with `compressor` inside the block."""
    modules = attention_modules(model)
    if any("forward" in vars(module) for module in modules):
        raise RuntimeError("this model is already patched: leave the enclosing ntkkv.compress block first")
    for module in modules:
        module.forward = MethodType(compressed_attention_forward, module)
        module.kv_compressor = compressor
    try:
        yield model
    finally:
        for module in modules:
            del module.forward, module.kv_compressor


def compressor_of(model):
    """The `Compressor` the model's attention runs with (ntkkv.compress or replace_llama), or None."""
    modules = attention_modules(model)
    if not modules:
        return None
    forward = getattr(modules[0].forward, "__func__", modules[0].forward)
    return modules[0].kv_compressor if forward is compressed_attention_forward else None
