"""Generation that returns, with the tokens, what the cache held; and the static decode path.

`generate(..., decode="dynamic")` is `model.generate` over a `CompressedCache`: any generate
argument works, and it is the reference. `decode="static"` prefills the same way, then moves each
layer's kept K/V into fixed-capacity buffers (`StaticCache`) and runs greedy decode steps that
write in place; on CUDA one decode step is captured in a CUDA graph and replayed, so a step costs
one graph launch instead of hundreds of kernel launches from Python. "auto" (the default) is static
on CUDA when the arguments allow it (greedy, stop tokens, min_new_tokens), dynamic otherwise.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cache import CompressedCache, CompressedLayer, StaticCache, state_sizes
from .compressor import Compressor
from .forward import compressor_of, patched, static_decode_layer
from .ops.decode_step import add_rms_norm
from .reconstruction import reconstructing

logger = logging.getLogger(__name__)

DECODE_MODES = ("auto", "static", "dynamic")
# generate arguments the static path reproduces (greedy decoding); sampling knobs are inert without do_sample
STATIC_ARGUMENTS = {"max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "eos_token_id", "pad_token_id",
                    "use_cache", "output_logits", "return_dict_in_generate", "temperature", "top_p", "top_k"}
# generation-config settings that change greedy tokens, with their inactive values
LOGIT_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                    "forced_eos_token_id": (None,), "sequence_bias": (None,), "min_length": (None, 0),
                    "exponential_decay_length_penalty": (None,), "encoder_repetition_penalty": (None, 1.0)}
STOP_CHECK_EVERY = 16  # decode steps between the host's looks at whether every sample has stopped


@dataclass
class GenerationResult:
    """sequences: (batch, prompt + new) as `model.generate` returns them.
    new_tokens: per sample, the generated ids (up to and including the first stop token).
    kv_kept: per sample, per layer, K/V entries held right after the prompt (padding excluded): what the
        prefill kept, plus the uncompressed columns after `prefill_length` when it is given.
    cache: the cache after generation (a `CompressedCache`, or a `StaticCache` from the static path).
    output: what `model.generate` returned (scores, logits... when asked for); from the static path an
        object with `sequences` and, with output_logits, `logits`.
    state_tokens: per sample, per layer, the memory (token equivalents) of what stands for evicted
        tokens: merged slots and summary state; kv_kept + state_tokens is the memory in use.
    decode: "static" or "dynamic", the path that ran.
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    kv_kept: list[list[int]]
    cache: object
    output: object = None
    state_tokens: list[list[float]] = None
    decode: str = "dynamic"

    @property
    def kv_lengths(self) -> list[list[int]]:
        """The name `kv_kept` had before; kept for existing code."""
        return self.kv_kept


@dataclass
class StaticOutput:
    """What the static path returns in place of generate's output: the sequences and, if asked, the
    logits of each step (a tuple of (batch, vocab) float32 tensors, as output_logits gives)."""

    sequences: torch.Tensor
    logits: tuple | None = None


def cache_argument_name(module) -> str:
    """transformers 5.17 calls the cache `past_key_values`; later 5.x releases call it `cache`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


STATIC_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SYNCING_ROPE = ("dynamic", "longrope")  # RoPE types that look at the positions on the host at each step


def static_unsupported(model, generate_kwargs) -> str | None:
    """Why this model or these arguments need the dynamic path (None if the static path reproduces them)."""
    if not any(cls.__name__ in STATIC_ARCHITECTURES for cls in type(model).__mro__):
        return f"the model class {type(model).__name__} (its decode step is written for Llama, Mistral and Qwen2)"
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"a sliding window of {config.sliding_window} tokens"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in SYNCING_ROPE:
        return f"RoPE type {rope.get('rope_type', rope.get('type'))!r}, which reads the positions on the host"
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1 or devices & {"cpu", "disk"} or any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "a model split across devices or offloaded (device_map)"
    extra = sorted(set(generate_kwargs) - STATIC_ARGUMENTS)
    if extra:
        return f"generate argument(s) {', '.join(extra)}"
    if generate_kwargs.get("do_sample") or (generate_kwargs.get("num_beams") or 1) != 1:
        return "sampling or beam search (the static path decodes greedily)"
    if not generate_kwargs.get("max_new_tokens"):
        return "no max_new_tokens"
    generation_config = getattr(model, "generation_config", None)
    for name, inactive in LOGIT_PROCESSORS.items():
        if getattr(generation_config, name, None) not in inactive:
            return f"the generation config's {name}={getattr(generation_config, name)!r}"
    return None


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, stop_token_ids=None, prefill_length: int | None = None,
             decode: str = "auto", prefill_batch_size: int | None = None, cuda_graph: bool | None = None,
             tokenizer=None, **generate_kwargs) -> GenerationResult:
    """Greedy generation with a fresh compressed cache per call, reporting the K/V entries each layer kept.

    prefill_length: compress only the first `prefill_length` columns (the context). They are fed in one
        forward, which the patched attention compresses; the rest of the prompt (the question, the end of
        the template) is then read over the compressed cache, uncompressed, before generation starts.
        Left padding must lie within these first columns.
    decode: "auto" (static on CUDA when the model and the arguments allow, else dynamic), "static" or
        "dynamic" (see the module's docstring). The static path takes Llama, Mistral and Qwen2 on one device,
        without a sliding window; an unpatched model (full KV) goes through it with every token kept.
    prefill_batch_size: static path only: prefill this many samples at a time (each compressed), then
        decode the whole batch together; a batch larger than one prefill fits in memory can then decode.
    cuda_graph: static path only: capture the decode step in a CUDA graph (None: on CUDA, unless a summary
        state changes shape as it grows, as the exact one does); False runs the same steps eagerly.
    tokenizer: the model's; KVzip words its reconstruction request with it (`ntkkv.reconstruction`).
    Other generate arguments pass through to model.generate on the dynamic path.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode {decode!r}; choose one of: {', '.join(DECODE_MODES)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prefill_length is not None:
        _check_prefill_length(prefill_length, attention_mask)
    if prefill_batch_size is not None and (not isinstance(prefill_batch_size, int) or prefill_batch_size < 1):
        raise ValueError(f"prefill_batch_size must be a positive integer or None, got {prefill_batch_size!r}")
    generate_kwargs.setdefault("do_sample", False)
    if stop_token_ids is not None:
        generate_kwargs["eos_token_id"] = list(stop_token_ids)
    reason = static_unsupported(model, generate_kwargs)
    if decode == "static" and reason is not None:
        raise ValueError(f"decode='static' cannot reproduce {reason}; use decode='dynamic'")
    if decode == "auto":
        decode = "static" if input_ids.is_cuda and reason is None else "dynamic"
        if input_ids.is_cuda and reason is not None:
            logger.info("dynamic decode: the static path cannot reproduce %s", reason)
    if decode == "static":
        return _generate_static(model, input_ids, attention_mask, prefill_length, prefill_batch_size, cuda_graph,
                                generate_kwargs, tokenizer)
    if prefill_batch_size is not None or cuda_graph is not None:
        raise ValueError("prefill_batch_size and cuda_graph apply to decode='static'")
    return _generate_dynamic(model, input_ids, attention_mask, prefill_length, generate_kwargs, tokenizer)


def _generate_dynamic(model, input_ids, attention_mask, prefill_length, generate_kwargs,
                      tokenizer=None) -> GenerationResult:
    prompt_length = input_ids.shape[1]
    cache = CompressedCache(config=model.config)
    with reconstructing(model, cache, tokenizer):  # KVzip's pass, after the prefill: the next forward starts it
        if prefill_length is not None:
            _prefill(model, input_ids[:, :prefill_length], attention_mask[:, :prefill_length], cache)
        # with a pre-filled cache, generate feeds only the columns past cache.get_seq_length() (the tokens
        # seen, not kept), with positions counted over the whole attention mask
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                **{cache_argument_name(model): cache}, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    kept = _kept_after_prompt([cache], [input_ids.shape[0]], attention_mask,
                              prompt_length - prefill_length if prefill_length else 0)
    stops = generate_kwargs.get("eos_token_id")
    stops = {stops} if isinstance(stops, int) else set(stops or _eos_ids(model))
    new_tokens = [_cut_at_stop(row, stops) for row in sequences[:, prompt_length:].tolist()]
    state = [state_sizes(cache)] * input_ids.shape[0]
    return GenerationResult(sequences, new_tokens, kept, cache, output, state, "dynamic")


def _kept_after_prompt(caches, rows_per_cache, attention_mask, suffix: int) -> list[list[int]]:
    """Per sample and layer: the tokens its prefill kept, plus the columns read after a compressed
    prefill; a layer never compressed holds the whole real prompt."""
    real_prompt = attention_mask.sum(dim=1).tolist()
    kept, sample = [], 0
    for cache, rows in zip(caches, rows_per_cache):
        for row in range(rows):
            kept.append([layer.prefill_tokens[row] + suffix if isinstance(layer, CompressedLayer) and layer.selected
                         else int(real_prompt[sample]) for layer in cache.layers])
            sample += 1
    return kept


def _cut_at_stop(row: list[int], stops) -> list[int]:
    cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
    return row[:cut]


# -- the static path ----------------------------------------------------------------------------

def _generate_static(model, input_ids, attention_mask, prefill_length, prefill_batch_size, cuda_graph,
                     generate_kwargs, tokenizer=None) -> GenerationResult:
    batch, prompt_length = input_ids.shape
    max_new = int(generate_kwargs["max_new_tokens"])
    min_new = int(generate_kwargs.get("min_new_tokens") or 0)
    stops = generate_kwargs.get("eos_token_id")
    stops = [stops] if isinstance(stops, int) else list(stops or _eos_ids(model))
    pad = generate_kwargs.get("pad_token_id")
    pad = pad if pad is not None else getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (stops[0] if stops else 0)
    # full KV goes through the same path: every token kept
    context = nullcontext() if compressor_of(model) is not None else patched(model, Compressor(None))
    with context:
        compressor = compressor_of(model)
        caches, first_logits, rows_per_cache = [], [], []
        for start in range(0, batch, prefill_batch_size or batch):
            rows = slice(start, start + (prefill_batch_size or batch))
            cache = CompressedCache(config=model.config)
            with reconstructing(model, cache, tokenizer):  # KVzip's pass, after the prefill
                first_logits.append(_prefill_rows(model, input_ids[rows], attention_mask[rows], prefill_length,
                                                  cache))
            caches.append(cache)
            rows_per_cache.append(input_ids[rows].shape[0])
        kept = _kept_after_prompt(caches, rows_per_cache, attention_mask,
                                  prompt_length - prefill_length if prefill_length else 0)
        summary = compressor.summary
        static = StaticCache.from_compressed(caches, room=max_new, ratchet=compressor.ratchet,
                                             merges_slots=summary is not None and summary.merges_slots)
        del caches
        decoder = StaticDecoder(model, static, torch.cat(first_logits).float(), attention_mask.sum(dim=1),
                                max_new, min_new, stops, pad, keep_logits=bool(generate_kwargs.get("output_logits")),
                                capture=cuda_graph)
        tokens, logits = decoder.run()
    stop_set = set(stops)
    new_tokens = [_cut_at_stop(row, stop_set) for row in tokens.tolist()]
    generated = max(len(row) for row in new_tokens)  # generate stops once every sample has
    padded = torch.tensor([row + [pad] * (generated - len(row)) for row in new_tokens], dtype=torch.long)
    sequences = torch.cat([input_ids, padded.to(input_ids.device)], dim=1)
    output = sequences
    if generate_kwargs.get("return_dict_in_generate"):
        output = StaticOutput(sequences, tuple(logits[:generated]) if logits is not None else None)
    state = [state_sizes(static)] * batch
    return GenerationResult(sequences, new_tokens, kept, static, output, state, "static")


def _prefill_rows(model, input_ids, attention_mask, prefill_length, cache) -> torch.Tensor:
    """Prefill some rows of the batch into `cache` (columns that are padding in every row dropped) and
    return the logits (rows, vocab) of each row's last prompt token."""
    first_real = int(attention_mask.any(dim=0).long().argmax())
    if prefill_length is not None:
        first_real = min(first_real, prefill_length - 1)
    input_ids, attention_mask = input_ids[:, first_real:], attention_mask[:, first_real:]
    if prefill_length is None:
        return _prefill(model, input_ids, attention_mask, cache)
    cut = prefill_length - first_real
    _prefill(model, input_ids[:, :cut], attention_mask[:, :cut], cache)
    # the rest of the prompt, read over the compressed context at positions counted over the whole mask
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    output = model(input_ids=input_ids[:, cut:], attention_mask=attention_mask, position_ids=positions[:, cut:],
                   use_cache=True, logits_to_keep=1, **{cache_argument_name(model): cache})
    return output.logits[:, -1]


class StaticDecoder:
    """Greedy decode steps over a `StaticCache`: every per-step quantity lives in a device tensor that
    the step updates in place, so that the step can be captured once in a CUDA graph and replayed.

    One step: embed the last token, run the decoder layers (each writes its K/V in place and attends over
    its capacity), the final norm and the head on that one position, then pick the next token (stop
    tokens blocked until min_new_tokens), record it, and advance positions and counters.
    """

    def __init__(self, model, cache: StaticCache, first_logits, next_positions, max_new: int, min_new: int,
                 stop_ids, pad_id: int, keep_logits: bool = False, capture: bool | None = None):
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.layers = self.decoder.layers[: model.config.get_text_config(decoder=True).num_hidden_layers]
        self.cache = cache
        batch, vocab = first_logits.shape
        device = first_logits.device
        self.max_new, self.min_new = max_new, min_new
        self.stop = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.stop[[token for token in stop_ids if 0 <= token < vocab]] = True
        self.step = torch.zeros((), dtype=torch.long, device=device)  # index of the token being chosen
        self.tokens = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
        self.logits = torch.empty(max_new, batch, vocab, device=device) if keep_logits else None
        self.input_ids = torch.empty(batch, 1, dtype=torch.long, device=device)
        self.position_ids = next_positions.to(device=device, dtype=torch.long).view(batch, 1).clone()
        states_capturable = all(getattr(layer.state, "static_shape", True) for layer in cache.layers)
        self.capture = (device.type == "cuda" and states_capturable) if capture is None else capture
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._choose(first_logits)

    def _choose(self, logits) -> None:
        if self.logits is not None:
            self.logits.index_copy_(0, self.step.view(1), logits[None])
        blocked = self.stop & (self.step < self.min_new)
        chosen = logits.masked_fill(blocked, -math.inf).argmax(dim=-1)
        self.tokens.index_copy_(1, self.step.view(1), chosen[:, None])
        self.input_ids.copy_(chosen[:, None])
        self.step += 1

    def _step(self) -> None:
        hidden = self.decoder.embed_tokens(self.input_ids)
        position_embeddings = self.decoder.rotary_emb(hidden, self.position_ids)
        write_slots, used_slots = self.cache.write_slots()
        ragged_write, ragged_used = self.cache.ragged_slots()
        residual = None
        for layer in self.layers:
            hidden, residual = static_decode_layer(layer, hidden, residual, position_embeddings, self.cache,
                                                   write_slots, used_slots, ragged_write, ragged_used)
        norm = self.decoder.norm
        hidden, _ = add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
        logits = self.head(hidden[:, -1]).float()
        self.position_ids += 1
        self.cache.count += 1
        self._choose(logits)

    def _run_step(self) -> None:
        if not self.capture:
            self._step()
            return
        graph = self.graphs.get(self.cache.folding)
        if graph is not None:
            graph.replay()
            return
        # the first step of each kind runs eagerly on a side stream (Triton compiles, workspaces and the
        # learned map's device copy are made), then the same step is captured for the steps after it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._step()
        self.graphs[self.cache.folding] = graph

    def _finished(self, steps: int) -> bool:
        written = torch.arange(self.max_new, device=self.tokens.device) < steps
        return bool((self.stop[self.tokens] & written).any(dim=1).all())

    def run(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode until every sample has stopped or max_new tokens exist. Returns the tokens
        (batch, max_new; pad after the last step run) on the host and the logits buffer (on the
        device, as generate's) or None."""
        steps = 1
        while steps < self.max_new:
            if steps % STOP_CHECK_EVERY == 0 and self._finished(steps):
                break
            self.cache.before_step()
            self._run_step()
            self.cache.after_step()
            steps += 1
        self.graphs.clear()
        return self.tokens.cpu(), self.logits


def _check_prefill_length(prefill_length, attention_mask) -> None:
    prompt_length = attention_mask.shape[1]
    if isinstance(prefill_length, bool) or not isinstance(prefill_length, int) \
            or not 1 <= prefill_length <= prompt_length - 1:
        raise ValueError(f"prefill_length must be an int from 1 to {prompt_length - 1} (one less than the "
                         f"{prompt_length} prompt columns), got {prefill_length!r}")
    if not attention_mask[:, prefill_length:].bool().all():
        # the columns after the prefill are read as real tokens by the patched attention
        raise ValueError(f"padding after prefill_length {prefill_length}: pad on the left, within the prefill")


def _prefill(model, input_ids, attention_mask, cache) -> torch.Tensor:
    """One forward over the prefix into `cache`: the compressed prefill, as model.generate would feed it.
    Returns the logits (batch, vocab) of the last column."""
    # generate's positions: counted over real tokens, so left padding does not shift them
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1, **{cache_argument_name(model): cache})
    return output.logits[:, -1]


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
