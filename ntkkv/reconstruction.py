"""KVzip's reconstruction pass: scores for a prompt's tokens from the model repeating its context.

Under a KVzip policy, `reconstructing(model, cache, tokenizer)` wraps a prefill (`ntkkv.generate` does):
1. the prefill runs with every layer keeping its whole prompt (and the observation window's queries);
2. before the next forward over `cache` (the question, or the first decode step), or at the block's end,
   each sample's context is repeated chunk by chunk: the model reads a request to repeat it, then the
   chunk itself, over the sample's full cache, which the read does not grow. Each layer's queries of that
   read give every token of the chunk its score (`max_attention`): the most attention any of them, and
   any query head of its KV head, gives it, the softmax running over the sinks, the chunk and the read
   itself (the paper's subsampled keys);
3. each layer is then compressed by the policy with those scores (`Compressor.compress_layer`).
The pass reads the prompt once more, chunk by chunk; its extra memory is one chunk's read, whatever the
context's length.
"""

from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch

from .cache import CompressedCache
from .compressor import Compressor
from .models import attention_modules
from .policies.kvzip import KVzip

FIRST_REQUEST = "Repeat the previous context exactly."
LATER_REQUEST = "Repeat the part of the previous context exactly, starting with"
# per chat-template family: what ends the context's turn and opens the request, and what ends the request
# and opens the answer; a new user turn, so that a context ending in the user's turn (the question outside)
# and one ending in the assistant's header (the question inside) both make a well-formed conversation
TEMPLATES = {
    "llama3": ("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),  # Qwen2, SmolLM2
    "mistral": ("</s>[INST] ", " [/INST]"),
    "plain": ("\n\n", "\n\n"),
}
TEMPLATE_MARKERS = (("llama3", "<|start_header_id|>"), ("chatml", "<|im_start|>"), ("mistral", "[INST]"))
REFERENCE_POSITIONS = 256  # reconstruction positions whose queries a refitting summary fits to, per layer
_UNSET = object()


@dataclass
class ReconstructionPrompt:
    """Token ids of the request read between the cached context and each chunk's copy.

    first: the first chunk's request (the turn's opening and "Repeat the previous context exactly.").
    later: a later chunk's ("... starting with"), followed by the context's `overlap` tokens before the chunk.
    closing: what ends the request and opens the answer, the chunk's copy.
    """

    first: list[int]
    later: list[int]
    closing: list[int]
    overlap: int = 8

    def chunk_inputs(self, context: list[int], sinks: int, chunk_size: int) -> list[tuple[int, int, list[int]]]:
        """(start, stop, input ids) of each chunk [start, stop) of context[sinks:], in order."""
        inputs = []
        for start in range(sinks, len(context), chunk_size):
            stop = min(start + chunk_size, len(context))
            request = self.first if start == sinks else self.later + context[max(start - self.overlap, 0): start]
            inputs.append((start, stop, request + self.closing + context[start:stop]))
        return inputs


def template_family(tokenizer) -> str:
    """The chat-template family of the tokenizer (a key of TEMPLATES), "plain" without a known template."""
    template = getattr(tokenizer, "chat_template", None)
    template = " ".join(template.values()) if isinstance(template, dict) else template or ""
    return next((family for family, marker in TEMPLATE_MARKERS if marker in template), "plain")


def reconstruction_prompt(tokenizer) -> ReconstructionPrompt:
    """The reconstruction request in the tokenizer's chat template (the one place that words it)."""
    opening, closing = TEMPLATES[template_family(tokenizer)]

    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ReconstructionPrompt(ids(opening + FIRST_REQUEST), ids(opening + LATER_REQUEST), ids(closing))


def max_attention(queries, sink_keys, chunk_keys, own_keys, scaling: float, query_block: int | None = None):
    """(batch, kv_heads, c) float32: for each chunk key, the most softmax attention it gets from any of the
    queries (batch, heads, m, d) and any query head of its KV head. The softmax runs over the sink keys
    (batch, kv_heads, s, d), the chunk's keys (batch, kv_heads, c, d) and the queries' own keys
    (batch, kv_heads, m, d), causal among these; `query_block` queries at a time (exact: rows are independent)."""
    batch, heads, m, head_dim = queries.shape
    kv_heads, sinks, chunk = chunk_keys.shape[1], sink_keys.shape[2], chunk_keys.shape[2]
    grouped = queries.view(batch, kv_heads, heads // kv_heads, m, head_dim)
    keys = torch.cat([sink_keys, chunk_keys, own_keys], dim=2).float()
    block = query_block or max(1, 2**26 // (batch * heads * keys.shape[2]))
    own = torch.arange(m, device=keys.device)
    best = keys.new_zeros(batch, kv_heads, chunk)
    for start in range(0, m, block):
        stop = min(start + block, m)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped[:, :, :, start:stop].float(), keys) * scaling
        logits[..., sinks + chunk:].masked_fill_(own[None, :] > own[start:stop, None], -math.inf)
        weights = logits.softmax(dim=-1)[..., sinks: sinks + chunk]
        best = torch.maximum(best, weights.amax(dim=(2, 3)))
    return best


def read_scores(queries, keys, start: int, stop: int, sinks: int, scaling: float, query_block: int | None = None):
    """(batch, kv_heads, stop - start) float32: the scores of the context's tokens [start, stop) from one chunk's
    read, its queries (batch, heads, m, d) over `keys` (batch, kv_heads, context + m, d), the context's then the
    read's own: `max_attention` with the softmax over the first `sinks` context keys, the chunk's and the read's."""
    length = keys.shape[2] - queries.shape[2]
    sinks = min(sinks, length)
    return max_attention(queries, keys[:, :, :sinks], keys[:, :, start:stop], keys[:, :, length:], scaling,
                         query_block)


@dataclass
class HoldingCompressor(Compressor):
    """The prefill's compressor while the reconstruction pass is pending: every layer keeps its whole
    prompt, as full KV does, and the last `window` queries of each layer are kept for the compression."""

    window: int = 8

    def __post_init__(self):
        super().__post_init__()
        self.window_queries: dict[int, torch.Tensor] = {}
        self.scalings: dict[int, float] = {}

    def compress_layer(self, queries, keys, values, valid, layer_idx: int, num_layers: int, scaling: float,
                       scores=None, reference_queries=None):
        n = keys.shape[2]
        self.window_queries[layer_idx] = queries[:, :, n - min(self.window, n):].clone()  # not a view of all
        self.scalings[layer_idx] = scaling
        return super().compress_layer(queries, keys, values, valid, layer_idx, num_layers, scaling)


class Reconstruction:
    """One prefill's reconstruction pass (see the module's docstring). After it, `scores` holds per layer
    (batch, kv_heads, n) float32 (0 at padding and sinks), or None if no layer evicts anything."""

    def __init__(self, model, cache, compressor: Compressor, prompt: ReconstructionPrompt | None = None,
                 tokenizer=None):
        self.model, self.cache, self.compressor = model, cache, compressor
        self.prompt, self.tokenizer = prompt, tokenizer
        self.policy: KVzip = compressor.policy
        self.modules = attention_modules(model)
        self.decoder = model.get_decoder()
        self.holding = HoldingCompressor(None, window=self.policy.window_size)
        self.prefill_ids = None
        self.busy = False  # inside the pass's own forwards
        self.done = False
        self.scores = None
        self._hooks, self._saved = [], None
        self._read = None  # during a chunk's read: (cache, held K/V per layer, sample, first column, start, stop)
        self._projected: dict[int, torch.Tensor] = {}
        self._references = None

    # -- the prefill and the trigger ----------------------------------------------------------------
    def install(self) -> None:
        """Every attention module holds its whole prompt; the decoder's forwards are watched."""
        # the compressor may be the module's own (ntkkv.compress) or its class's (replace_llama): put back either
        self._saved = [vars(module).get("kv_compressor", _UNSET) for module in self.modules]
        for module in self.modules:
            module.kv_compressor = self.holding
        self._hooks.append(self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module, saved in zip(self.modules, self._saved or []):
            if saved is _UNSET:
                del module.kv_compressor
            else:
                module.kv_compressor = saved
        self._saved = None

    def _before_forward(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.busy or self.done or cache is not self.cache:
            return None
        if self.prefill_ids is None:  # the prefill: its tokens are the context to repeat
            if kwargs.get("input_ids") is None:
                raise ValueError("kvzip repeats the prompt's tokens: prefill with input_ids, not inputs_embeds")
            self.prefill_ids = kwargs["input_ids"]
            return None
        self.finish()  # the forward after the prefill reads the compressed cache
        return None

    @torch.no_grad()
    def finish(self) -> None:
        """Score and compress the prefilled cache (once; nothing if nothing was prefilled)."""
        if self.done or self.prefill_ids is None:
            return
        self.busy = True
        try:
            self.scores = self._score() if self._evicts() else None
            self._compress()
        finally:
            self.busy, self.done = False, True
            self.remove()

    def _evicts(self) -> bool:
        """Whether any sample's plan evicts in any layer (else the compression keeps everything: no pass)."""
        layer = self.cache.layers[0]
        lengths = set((layer.bias[:, 0] > -math.inf).sum(dim=-1).tolist())
        width, head_dim = layer.keys.shape[2], layer.keys.shape[-1]
        return any(width > plan.exact for length in lengths
                   for plan in self.compressor.plans(len(self.modules), head_dim, int(length)))

    # -- the pass ------------------------------------------------------------------------------------
    def _score(self) -> list[torch.Tensor]:
        if self.prompt is None:
            if self.tokenizer is None:
                raise ValueError("kvzip words its reconstruction request with the tokenizer: pass tokenizer= to "
                                 "ntkkv.generate")
            self.prompt = reconstruction_prompt(self.tokenizer)
        layers = self.cache.layers
        batch, kv_heads, width, _ = layers[0].keys.shape
        valid = layers[0].bias[:, 0] > -math.inf
        if self.prefill_ids.shape != (batch, width):
            raise ValueError(f"kvzip: the prefill read {tuple(self.prefill_ids.shape)} tokens but the cache holds "
                             f"{batch} x {width}")
        scores = [layer.keys.new_zeros(batch, kv_heads, width, dtype=torch.float32) for layer in layers]
        samples = []
        for sample in range(batch):
            first = int(valid[sample].int().argmax())
            if not valid[sample, first:].all():
                raise ValueError("kvzip: padding inside a prompt; pad on the left")
            context = self.prefill_ids[sample, first:].tolist()
            samples.append((first, self.prompt.chunk_inputs(context, min(self.policy.sinks, len(context)),
                                                             self.policy.chunk_size)))
        self._plan_references(samples)
        projections = [module.q_proj.register_forward_hook(self._keep_projection) for module in self.modules]
        readers = [module.register_forward_hook(self._score_layer, with_kwargs=True) for module in self.modules]
        keyword = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        # the reads run the model's own attention over the sample's whole cache: one causal mask shared by
        # the heads (or none with flash attention), where the patched forward's slot biases would be per head
        patched_forwards = [vars(module).get("forward", _UNSET) for module in self.modules]
        for module in self.modules:
            module.forward = MethodType(getattr(type(module), "_ntkkv_original_forward", type(module).forward), module)
        try:
            for sample, (first, inputs) in enumerate(samples):
                held = [(layer.keys[sample: sample + 1, :, first:], layer.values[sample: sample + 1, :, first:])
                        for layer in layers]
                reading = CompressedCache(num_layers=len(layers))
                for layer, (keys, values) in zip(reading.layers, held):
                    layer.update(keys, values)
                length = width - first
                for chunk, (start, stop, ids) in enumerate(inputs):
                    self._read = (reading, held, scores, sample, first, start, stop, chunk)
                    device = layers[0].keys.device
                    self.decoder(input_ids=torch.tensor([ids], device=device), use_cache=True,
                                 position_ids=torch.arange(length, length + len(ids), device=device)[None],
                                 **{keyword: reading})
        finally:
            self._read = None
            for hook in projections + readers:
                hook.remove()
            for module, forward in zip(self.modules, patched_forwards):
                if forward is _UNSET:
                    del module.forward
                else:
                    module.forward = forward
        return scores

    def _keep_projection(self, module, args, output) -> None:
        self._projected[id(module)] = output

    def _score_layer(self, module, args, kwargs, output) -> None:
        reading, held, scores, sample, first, start, stop, chunk = self._read
        index = module.layer_idx
        projected = self._projected.pop(id(module.q_proj))
        m = projected.shape[1]
        queries = projected.view(1, m, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        queries = sys.modules[type(module).__module__].apply_rotary_pos_emb(queries, queries, cos, sin)[0]
        layer = reading.layers[index]
        keys = layer.keys  # the sample's context, then the read's own keys
        best = read_scores(queries, keys, start, stop, self.policy.sinks, module.scaling, self.policy.query_block)
        scores[index][sample, :, first + start: first + stop] = best[0]
        if self._references is not None:
            picked = self._references["picked"][sample][chunk]
            kv_heads = keys.shape[1]
            rows = queries.view(1, kv_heads, -1, m, module.head_dim)[:, :, :, picked.to(queries.device)]
            self._references["rows"][index][sample].append(rows.reshape(1, kv_heads, -1, module.head_dim))
        layer.reset()  # the read does not grow the cache
        layer.update(*held[index])

    def _plan_references(self, samples) -> None:
        """For a refitting summary: which read positions of each chunk give their queries, evenly spread
        over each sample's reads, the same number for every sample."""
        summary = self.compressor.summary
        self._references = None
        if summary is None or not summary.refits:
            return
        totals = [sum(len(ids) for _, _, ids in inputs) for _, inputs in samples]
        count = min([REFERENCE_POSITIONS] + totals)
        if count == 0:
            return
        picked = []
        for total, (_, inputs) in zip(totals, samples):
            positions, offset, per_chunk = torch.arange(count) * total // count, 0, []
            for _, _, ids in inputs:
                inside = (positions >= offset) & (positions < offset + len(ids))
                per_chunk.append(positions[inside] - offset)
                offset += len(ids)
            picked.append(per_chunk)
        self._references = {"picked": picked, "rows": [[[] for _ in samples] for _ in self.modules]}

    # -- the compression -----------------------------------------------------------------------------
    def _compress(self) -> None:
        layers, num_layers = self.cache.layers, len(self.modules)
        first = layers[0]
        batch, _, width, head_dim = first.keys.shape
        heads = self.holding.window_queries[0].shape[1]
        queries = first.keys.new_zeros(batch, heads, width, head_dim)  # only the window's are read
        for index, layer in enumerate(layers):
            window = self.holding.window_queries.pop(index)
            queries[:, :, width - window.shape[2]:] = window
            reference = None
            if self._references is not None:
                reference = torch.cat([torch.cat(rows, dim=2) for rows in self._references["rows"][index]])
            compressed = self.compressor.compress_layer(
                queries, layer.keys, layer.values, layer.bias[:, 0] > -math.inf, index, num_layers,
                self.holding.scalings[index], scores=None if self.scores is None else self.scores[index],
                reference_queries=reference)
            layer.store(compressed, layer.logical_length)
        self._references = None


@contextmanager
def reconstructing(model, cache, tokenizer=None, prompt: ReconstructionPrompt | None = None):
    """Around the prefill of `cache` under a KVzip policy: defer the compression until the reconstruction
    pass has scored the prompt (see the module's docstring); the pass runs before the next forward over
    `cache` or when the block ends. `prompt` (else built from `tokenizer`, needed only once a layer evicts)
    words the request. Yields the `Reconstruction` (its `scores` once done), or None when the model's
    policy is not KVzip's (nothing changes then)."""
    modules = attention_modules(model)
    compressor = getattr(modules[0], "kv_compressor", None) if modules else None
    if compressor is None or not isinstance(compressor.policy, KVzip):
        yield None
        return
    run = Reconstruction(model, cache, compressor, prompt, tokenizer)
    run.install()
    try:
        yield run
        run.finish()
    finally:
        run.remove()
