"""One attention forward for Llama, Mistral and Qwen2, every backend, every method.

Prefill (the layer's cache is empty): the model's own attention over the whole prompt, then
the method picks what each KV head keeps and the rest goes to the kernel state, if any.
Later calls: attend over the kept slots plus the new tokens, with each slot's bias as an
additive mask; with a kernel state, merge it in through the log-sum-exp.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import CompressedLayer, ensure_compressed_layer
from .kernels import ClusterKernel, KernelPlan, Summary, build_kernel, merge_attention
from .kernels.merge_triton import HEAD_DIMS as FUSED_HEAD_DIMS
from .kernels.merge_triton import merged_decode_attention
from .methods import Method, SelectionInputs, build_method

# cuDNN's sdpa builds a graph for every new key length (~40 ms on an H200, torch 2.11) and decode
# sees a new length every step; the others need no such set-up (benchmarks/decode_probe.py)
logger = logging.getLogger(__name__)

DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

@dataclass
class Compressor:
    """What the patched forward needs: the selection policy, optionally a kernel for the evicted
    tokens, and optionally the ratchet: the most generated tokens kept exact, older ones fold
    into the kernel's summary (or are dropped without a kernel)."""

    method: Method
    kernel: object | None = None
    ratchet: int | None = None

    def plan(self, budget: int, head_dim: int) -> KernelPlan:
        if self.kernel is None:
            return KernelPlan(budget, 0, 0.0)
        return self.kernel.plan(budget, head_dim, self.method.min_kept())

    @torch.no_grad()
    def compress_prefill(self, module, layer: CompressedLayer, queries, keys, values, attention_mask) -> None:
        batch, kv_heads, n, head_dim = keys.shape
        valid = padding_mask(attention_mask, batch, n, keys.device)
        bias = torch.zeros(batch, kv_heads, n, device=keys.device).masked_fill(~valid[:, None, :], -math.inf)
        budget = self.method.layer_budgets(module.config.num_hidden_layers, n)[module.layer_idx]
        plan = self.plan(budget, head_dim)
        if n <= plan.kept:
            nothing = torch.zeros(batch, kv_heads, n, dtype=torch.bool, device=keys.device)
            state = self._summarise(keys, values, nothing, plan, module.layer_idx).state
            layer.store(keys, values, bias, n, state=state)
            layer.planned_clusters = plan.clusters
            return
        grouped_queries = queries.view(batch, kv_heads, -1, n, head_dim)
        inputs = SelectionInputs(grouped_queries, keys, values, valid, module.scaling)
        policy = self.method.for_budget(plan.kept)
        kept = policy.select(inputs, module.layer_idx, plan.kept)
        gather_index = kept[..., None].expand(-1, -1, -1, head_dim)
        kept_keys, kept_values, kept_bias = keys.gather(2, gather_index), values.gather(2, gather_index), bias.gather(2, kept)
        evicted = valid[:, None, :].expand(batch, kv_heads, n).clone()
        evicted.scatter_(2, kept, False)
        window = min(policy.window_size, n)
        window_queries = grouped_queries[:, :, :, n - window :].reshape(batch, kv_heads, -1, head_dim)
        summary = self._summarise(keys, values, evicted, plan, module.layer_idx, window_queries, module.scaling)
        merged = 0
        if summary.slot_keys is not None:  # merged slots go first: generated tokens stay the last slots
            merged = summary.slot_keys.shape[-2]
            kept_keys = torch.cat([summary.slot_keys, kept_keys], dim=-2)
            kept_values = torch.cat([summary.slot_values, kept_values], dim=-2)
            kept_bias = torch.cat([summary.slot_bias, kept_bias], dim=-1)
        layer.store(kept_keys, kept_values, kept_bias, n, summary.state, merged)
        layer.planned_clusters = plan.clusters

    def _summarise(self, keys, values, evicted, plan, layer_idx, window_queries=None, scaling=None) -> Summary:
        if self.kernel is None:
            return Summary()
        return self.kernel.summarise(keys, values, evicted, plan, layer_idx, window_queries, scaling)

    @torch.no_grad()
    def fold_oldest(self, layer: CompressedLayer) -> None:
        """The ratchet: past `ratchet` generated tokens, the oldest fold into the summary."""
        excess = layer.appended_slots() - self.ratchet
        if excess <= 0:
            return
        keys, values = layer.pop_oldest_appended(excess)
        if layer.state is not None:
            layer.state.fold(keys, values, keys.new_ones(keys.shape[:3]))
        elif self.kernel is not None:  # merged slots fold in; without a summary the tokens are dropped
            self.kernel.fold_into_slots(layer, keys, values)


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
    grouped = queries.reshape(batch, kv_heads, group * num_queries, head_dim)
    output = merged_attention(grouped, layer, module.scaling, num_queries)
    output = output.view(batch, heads, num_queries, head_dim).transpose(1, 2).to(queries.dtype)
    return output, None


def merged_attention(grouped_queries, layer: CompressedLayer, scaling: float, num_queries: int) -> torch.Tensor:
    """The general path, at KV-head granularity: softmax over the slots with their biases (causal
    among the `num_queries` newest), merged with the kernel state through the log-sum-exp.

    grouped_queries (batch, kv_heads, group * num_queries, d) -> float32 output of the same shape.
    """
    state = layer.state.read(grouped_queries, scaling) if layer.state is not None else (None, None)
    if num_queries == 1 and grouped_queries.is_cuda and head_dim_fuses(grouped_queries.shape[-1]):
        # decode: one fused Triton kernel for the softmax over the slots and the merge (plain torch below
        # is its reference)
        return merged_decode_attention(grouped_queries, layer.keys, layer.values, layer.slot_bias(), scaling, *state)
    group = grouped_queries.shape[2] // num_queries
    logit_bias = slot_logit_bias(layer.slot_bias(), num_queries).repeat(1, 1, group, 1)
    lse, output = reference_attention(grouped_queries, layer.keys, layer.values, logit_bias, scaling)
    if layer.state is not None:
        output = merge_attention(lse, output, *state)
    return output


def head_dim_fuses(head_dim: int) -> bool:
    return head_dim in FUSED_HEAD_DIMS


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
        if self.ntkkv.ratchet is not None:
            self.ntkkv.fold_oldest(layer)
        output, weights = attend_to_cache(self, queries, layer, interface, backend, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(output), weights


# -- entry points -------------------------------------------------------------------------------

def _attention_modules(model) -> list[torch.nn.Module]:
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]


def build_compressor(method: str = "snapkv", max_capacity_prompt=2048, window_size=None, kernel_size: int = 7,
                     pooling: str = "maxpool", gqa_reduce: str = "mean", kernel=None, state_budget=None,
                     cluster_by=None, rank=None, kernel_path=None, ratchet=None, model_shape=None,
                     **method_params) -> Compressor | None:
    """The `Compressor` for these parameters (None for fullkv), checked against the model's
    (layers, kv_heads, head_dim) when given."""
    policy = build_method(method, max_capacity_prompt, window_size, kernel_size=kernel_size, pooling=pooling,
                          gqa_reduce=gqa_reduce, **method_params)
    kernel = build_kernel(kernel, state_budget=state_budget, cluster_by=cluster_by, rank=rank,
                          kernel_path=kernel_path)
    if ratchet is not None and (not isinstance(ratchet, int) or isinstance(ratchet, bool) or ratchet < 0):
        raise ValueError(f"ratchet must be a number of generated tokens ≥ 0 kept exact, or None, got {ratchet!r}")
    if policy is None:
        return None
    compressor = Compressor(policy, kernel, ratchet)
    if model_shape is not None:
        num_layers, kv_heads, head_dim = model_shape
        if kernel is not None:
            kernel.check_model(num_layers, kv_heads, head_dim)
        plans = [compressor.plan(budget, head_dim) for budget in policy.layer_budgets(num_layers)]
        if isinstance(kernel, ClusterKernel) and not any(plan.clusters for plan in plans):
            raise ValueError(f"kernel {kernel.name!r}: no layer's state budget holds a cluster (one costs "
                             f"{kernel.cluster_cost(head_dim):.1f} tokens at head_dim {head_dim}, with more than "
                             f"window_size={policy.window_size} tokens kept exact); raise state_budget or "
                             f"max_capacity_prompt")
        plainly = [layer for layer, plan in enumerate(plans) if plan.clusters == 0]
        if isinstance(kernel, ClusterKernel) and plainly:
            logger.info("kernel %s: layers %s have too small a budget for a cluster and evict plainly",
                        kernel.name, plainly)
    return compressor


def model_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


@contextmanager
def compress(model, method: str = "snapkv", max_capacity_prompt=2048, window_size=None, kernel_size: int = 7,
             pooling: str = "maxpool", gqa_reduce: str = "mean", kernel=None, state_budget=None, cluster_by=None,
             rank=None, kernel_path=None, ratchet=None, **method_params):
    """Patch this model's attention for the duration of the block; leaving it restores the model.

    method: one of ntkkv.METHODS (case-insensitive); "fullkv" leaves the model untouched.
    max_capacity_prompt: memory per layer and KV head in token equivalents (an int, or a list per
        layer): exact K/V entries plus, with a kernel, the summary of the evicted tokens.
    window_size: last tokens always kept (None: 8, or budget - 4 for StreamingLLM).
    kernel: what happens to evicted tokens: one of ntkkv.KERNELS ("none": dropped) or a kernel object.
    state_budget: the share of the budget the kernel may use (a fraction < 1, or tokens); default 1/8.
    cluster_by: "kmeans" (default) or "position"; rank: taylor2_lowrank's rank (default 4);
    kernel_path: the file of a learned kernel (train_kernel.py).
    ratchet: keep at most this many generated tokens exact; older ones fold into the kernel's
        summary (dropped without a kernel), so memory stays flat. None: generated tokens all stay.
    """
    from .models import check_attn_implementation, check_supported

    compressor = build_compressor(method, max_capacity_prompt, window_size, kernel_size, pooling, gqa_reduce, kernel,
                                  state_budget, cluster_by, rank, kernel_path, ratchet, model_shape(model),
                                  **method_params)
    if compressor is None:
        yield model
        return
    check_supported(model)
    check_attn_implementation(model.config._attn_implementation)
    modules = _attention_modules(model)
    if any("forward" in vars(module) for module in modules):
        raise RuntimeError("this model is already patched: leave the enclosing ntkkv.compress block first")
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
    compressor = build_compressor(method, **params)
    if compressor is None:
        attention_class.forward = attention_class._ntkkv_original_forward
        attention_class.ntkkv = None
        return
    attention_class.forward = compressed_attention_forward
    attention_class.ntkkv = compressor


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
