"""Greedy (or any) generation that returns, with the tokens, what the cache held."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .cache import CompressedCache, CompressedLayer, state_sizes


@dataclass
class GenerationResult:
    """sequences: (batch, prompt + new) as `model.generate` returns them.
    new_tokens: per sample, the generated ids (up to and including the first stop token).
    kv_kept: per sample, per layer, K/V entries held right after the prompt (padding excluded): what the
        prefill kept, plus the uncompressed columns after `prefill_length` when it is given.
    cache: the cache after generation.
    output: what `model.generate` returned (scores, logits... when asked for).
    state_tokens: per sample, per layer, the memory (token equivalents) of what stands for evicted
        tokens: merged slots and summary state; kv_kept + state_tokens is the memory in use.
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    kv_kept: list[list[int]]
    cache: object
    output: object = None
    state_tokens: list[list[float]] = None

    @property
    def kv_lengths(self) -> list[list[int]]:
        """The name `kv_kept` had before; kept for existing code."""
        return self.kv_kept


def cache_argument_name(model) -> str:
    """transformers 5.17 calls the cache `past_key_values`; later 5.x releases call it `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, stop_token_ids=None, prefill_length: int | None = None,
             **generate_kwargs) -> GenerationResult:
    """`model.generate` with a fresh cache per call, reporting the K/V entries each layer kept.

    Greedy by default (do_sample=False); other generate arguments pass through.
    prefill_length: compress only the first `prefill_length` columns (the context). They are fed in one
        forward, which the patched attention compresses; the rest of the prompt (the question, the end of
        the template) is then read over the compressed cache, uncompressed, before generation starts.
        Left padding must lie within these first columns.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_length = input_ids.shape[1]
    cache = CompressedCache(config=model.config)
    if prefill_length is not None:
        _check_prefill_length(prefill_length, attention_mask)
        _prefill(model, input_ids[:, :prefill_length], attention_mask[:, :prefill_length], cache)
    generate_kwargs.setdefault("do_sample", False)
    if stop_token_ids is not None:
        generate_kwargs["eos_token_id"] = list(stop_token_ids)
    # with a pre-filled cache, generate feeds only the columns past cache.get_seq_length() (the tokens
    # seen, not kept), with positions counted over the whole attention mask
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            **{cache_argument_name(model): cache}, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    # what each layer held right after the prompt: the tokens its prefill kept, plus the columns read
    # after a compressed prefill; a layer never compressed holds the whole real prompt
    suffix = prompt_length - prefill_length if prefill_length is not None else 0
    real_prompt = attention_mask.sum(dim=1).tolist()
    kept, state = [], []
    for sample in range(input_ids.shape[0]):
        kept.append([layer.prefill_tokens[sample] + suffix if isinstance(layer, CompressedLayer) and layer.selected
                     else int(real_prompt[sample]) for layer in cache.layers])
        state.append(state_sizes(cache))
    stops = set(generate_kwargs.get("eos_token_id") or _eos_ids(model))
    new_tokens = []
    for row in sequences[:, prompt_length:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        new_tokens.append(row[:cut])
    return GenerationResult(sequences, new_tokens, kept, cache, output, state)


def _check_prefill_length(prefill_length, attention_mask) -> None:
    prompt_length = attention_mask.shape[1]
    if isinstance(prefill_length, bool) or not isinstance(prefill_length, int) \
            or not 1 <= prefill_length <= prompt_length - 1:
        raise ValueError(f"prefill_length must be an int from 1 to {prompt_length - 1} (one less than the "
                         f"{prompt_length} prompt columns), got {prefill_length!r}")
    if not attention_mask[:, prefill_length:].bool().all():
        # the columns after the prefill are read as real tokens by the patched attention
        raise ValueError(f"padding after prefill_length {prefill_length}: pad on the left, within the prefill")


def _prefill(model, input_ids, attention_mask, cache) -> None:
    """One forward over the prefix into `cache`: the compressed prefill, as model.generate would feed it."""
    # generate's positions: counted over real tokens, so left padding does not shift them
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
          logits_to_keep=1, **{cache_argument_name(model): cache})


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
