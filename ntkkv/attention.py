"""One attention forward for Llama, Mistral and Qwen2, every backend, every method.

Prefill (the layer's cache is empty): the model's own attention over the whole prompt, then
the method picks what each KV head keeps and the rest goes to the kernel state, if any.
Later calls: attend over the kept slots plus the new tokens, with each slot's bias as an
additive mask; with a kernel state, merge it in through the log-sum-exp.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import CompressedLayer, ensure_compressed_layer
from .kernels import merge_attention
from .methods import Method, SelectionInputs, build_method

# cuDNN's sdpa builds a graph for every new key length (~40 ms on an H200, torch 2.11) and decode
# sees a new length every step; the others need no such set-up (benchmarks/decode_probe.py)
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

@dataclass
class Compressor:
    """What the patched forward needs: the selection policy and, optionally, a kernel."""

    method: Method
    kernel: object | None = None

    @torch.no_grad()
    def compress_prefill(self, module, layer: CompressedLayer, queries, keys, values, attention_mask) -> None:
        batch, kv_heads, n, head_dim = keys.shape
        valid = padding_mask(attention_mask, batch, n, keys.device)
        bias = torch.zeros(batch, kv_heads, n, device=keys.device).masked_fill(~valid[:, None, :], -math.inf)
        budget = self.method.layer_budgets(module.config.num_hidden_layers, n)[module.layer_idx]
        if n <= budget:
            layer.store(keys, values, bias, n, state=self.kernel.new_state() if self.kernel else None)
            return
        grouped_queries = queries.view(batch, kv_heads, -1, n, head_dim)
        inputs = SelectionInputs(grouped_queries, keys, values, valid, module.scaling)
        kept = self.method.select(inputs, module.layer_idx, budget)
        gather_index = kept[..., None].expand(-1, -1, -1, head_dim)
        state = None
        if self.kernel is not None:
            evicted = valid[:, None, :].expand(batch, kv_heads, n).clone()
            evicted.scatter_(2, kept, False)
            state = self.kernel.new_state()
            state.fold(keys, values, evicted.float())
        layer.store(keys.gather(2, gather_index), values.gather(2, gather_index), bias.gather(2, kept), n, state)


def padding_mask(attention_mask, batch: int, n: int, device) -> torch.Tensor:
    """(batch, n) bool, False at padding, read off whatever mask the model built."""
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:  # flash_attention_2 gets the 2D padding mask itself
        return attention_mask[:, -n:].bool()
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, 0, -n:, -n:]
    # a token is real if it sees itself; some masks open padding rows fully, which also opens
    # the last key to them, which no real earlier token sees
    own = allowed.diagonal(dim1=-2, dim2=-1).clone()
    sees_last = allowed[..., :-1, -1]
    own[:, :-1] &= ~sees_last
    return own.expand(batch, n)


def slot_logit_bias(bias: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(batch, kv_heads, slots) -> (batch, kv_heads, queries, slots): the slot bias, causal among
    the `num_queries` newest slots (the queries' own tokens)."""
    slots = bias.shape[-1]
    query_slots = torch.arange(slots - num_queries, slots, device=bias.device)[:, None]
    future = torch.arange(slots, device=bias.device)[None, :] > query_slots
    return bias[:, :, None, :].masked_fill(future, -math.inf)


def reference_attention(queries, keys, values, logit_bias, scaling):
    """Plain-torch attention at KV-head granularity, returning the log-sum-exp too.

    queries (b, h_kv, m, d) with the group's heads stacked on m; logit_bias (b, h_kv, m, slots).
    """
    logits = (queries.float() @ keys.float().transpose(-1, -2)) * scaling + logit_bias
    lse = logits.logsumexp(dim=-1)
    return lse, torch.nan_to_num(logits.softmax(dim=-1)) @ values.float()


def attend_to_cache(module, queries, layer: CompressedLayer, interface, backend: str, **kwargs):
    """Attention of `queries` (batch, heads, m, d) over everything the layer holds."""
    batch, heads, num_queries, head_dim = queries.shape
    kv_heads = layer.keys.shape[1]
    group = heads // kv_heads
    masked = layer.masked
    if layer.state is None and not (backend == "flash_attention_2" and masked):
        mask = None
        if backend != "flash_attention_2" and (masked or num_queries > 1):
            mask = slot_logit_bias(layer.slot_bias(), num_queries).repeat_interleave(group, dim=1).to(queries.dtype)
        if backend == "sdpa" and queries.is_cuda:
            with sdpa_kernel(DECODE_SDPA_BACKENDS):
                return interface(module, queries, layer.keys, layer.values, mask, dropout=0.0,
                                 scaling=module.scaling, **kwargs)
        return interface(module, queries, layer.keys, layer.values, mask, dropout=0.0, scaling=module.scaling, **kwargs)
    # the general path: explicit biases, and the kernel state merged through the log-sum-exp
    grouped = queries.reshape(batch, kv_heads, group * num_queries, head_dim)
    logit_bias = slot_logit_bias(layer.slot_bias(), num_queries).repeat(1, 1, group, 1)
    lse, output = reference_attention(grouped, layer.keys, layer.values, logit_bias, module.scaling)
    if layer.state is not None:
        log_mass, state_mean = layer.state.read(grouped, module.scaling)
        output = merge_attention(lse, output, log_mass, state_mean)
    output = output.view(batch, heads, num_queries, head_dim).transpose(1, 2).to(queries.dtype)
    return output, None


def compressed_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                                 past_key_values=None, cache=None, **kwargs):
    """Replaces `LlamaAttention.forward` (and Mistral's, Qwen2's); `self.ntkkv` is a `Compressor`."""
    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    apply_rotary_pos_emb = sys.modules[type(self).__module__].apply_rotary_pos_emb
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)

    backend = self.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(backend, sys.modules[type(self).__module__].eager_attention_forward)
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    layer = ensure_compressed_layer(cache, self.layer_idx) if cache is not None else None
    if layer is None or layer.num_slots() == 0:
        output, weights = interface(self, queries, keys, values, attention_mask, dropout=0.0,
                                    scaling=self.scaling, sliding_window=sliding_window, **kwargs)
        if layer is not None:
            self.ntkkv.compress_prefill(self, layer, queries, keys, values, attention_mask)
    else:
        layer.update(keys, values)
        output, weights = attend_to_cache(self, queries, layer, interface, backend, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(output), weights


# -- entry points -------------------------------------------------------------------------------

def _attention_modules(model) -> list[torch.nn.Module]:
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]


@contextmanager
def compress(model, method: str = "snapkv", max_capacity_prompt=2048, window_size=None, kernel_size: int = 7,
             pooling: str = "maxpool", gqa_reduce: str = "mean", kernel=None, **method_params):
    """Patch this model's attention for the duration of the block; leaving it restores the model.

    method: one of ntkkv.METHODS (case-insensitive); "fullkv" leaves the model untouched.
    max_capacity_prompt: K/V entries kept per layer and KV head (an int, or a list per layer).
    window_size: last tokens always kept (None: 8, or budget - 4 for StreamingLLM).
    kernel: optional factory of states for evicted tokens (see ntkkv.kernels).
    """
    from .models import check_attn_implementation, check_supported

    policy = build_method(method, max_capacity_prompt, window_size, kernel_size=kernel_size, pooling=pooling,
                          gqa_reduce=gqa_reduce, **method_params)
    if policy is None:
        yield model
        return
    check_supported(model)
    check_attn_implementation(model.config._attn_implementation)
    modules = _attention_modules(model)
    if any("forward" in vars(module) for module in modules):
        raise RuntimeError("this model is already patched: leave the enclosing ntkkv.compress block first")
    policy.layer_budgets(len(modules))  # a per-layer list of the wrong length fails here, not mid-forward
    compressor = Compressor(policy, kernel)
    for module in modules:
        module.forward = MethodType(compressed_attention_forward, module)
        module.ntkkv = compressor
    try:
        yield model
    finally:
        for module in modules:
            del module.forward, module.ntkkv


def _replace_class(attention_class, method, params):
    if "_ntkkv_original_forward" not in vars(attention_class):
        attention_class._ntkkv_original_forward = attention_class.forward
    params = dict(params)
    kernel = params.pop("kernel", None)
    policy = build_method(method, **params)
    if policy is None:
        attention_class.forward = attention_class._ntkkv_original_forward
        attention_class.ntkkv = None
        return
    attention_class.forward = compressed_attention_forward
    attention_class.ntkkv = Compressor(policy, kernel)


def replace_llama(method: str = "snapkv", **params) -> None:
    """The original harness's global switch: every LlamaAttention compresses with `method`
    (same parameters as `compress`); `replace_llama("fullkv")` restores the original forward."""
    from transformers.models.llama import modeling_llama

    _replace_class(modeling_llama.LlamaAttention, method, params)


def replace_mistral(method: str = "snapkv", **params) -> None:
    """As `replace_llama`, for MistralAttention."""
    from transformers.models.mistral import modeling_mistral

    _replace_class(modeling_mistral.MistralAttention, method, params)


def replace_qwen2(method: str = "snapkv", **params) -> None:
    """As `replace_llama`, for Qwen2Attention."""
    from transformers.models.qwen2 import modeling_qwen2

    _replace_class(modeling_qwen2.Qwen2Attention, method, params)
