"""Greedy (or any) generation that returns, with the tokens, what the cache held."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .cache import CompressedCache, CompressedLayer, kv_lengths


@dataclass
class GenerationResult:
    """sequences: (batch, prompt + new) as `model.generate` returns them.
    new_tokens: per sample, the generated ids (up to and including the first stop token).
    kv_lengths: per sample, per layer, K/V entries held right after the prefill (padding excluded).
    cache: the cache after generation.
    output: what `model.generate` returned (scores, logits... when asked for).
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    kv_lengths: list[list[int]]
    cache: object
    output: object = None


def cache_argument_name(model) -> str:
    """transformers 5.17 calls the cache `past_key_values`; later 5.x releases call it `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, stop_token_ids=None, **generate_kwargs) -> GenerationResult:
    """`model.generate` with a fresh cache per call, reporting the K/V entries each layer kept.

    Greedy by default (do_sample=False); other generate arguments pass through.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = CompressedCache(config=model.config)
    generate_kwargs.setdefault("do_sample", False)
    if stop_token_ids is not None:
        generate_kwargs["eos_token_id"] = list(stop_token_ids)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            **{cache_argument_name(model): cache}, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt_length = input_ids.shape[1]
    fed_tokens = max(sequences.shape[1] - prompt_length - 1, 0)  # the last token is never fed back
    real_prompt = attention_mask.sum(dim=1).tolist()
    held = kv_lengths(cache, per_sample=True)
    kept = []
    for sample, per_layer in enumerate(held):
        compressed = [isinstance(layer, CompressedLayer) and layer.selected for layer in cache.layers]
        kept.append([count - fed_tokens if was_compressed else int(real_prompt[sample])
                     for count, was_compressed in zip(per_layer, compressed)])
    stops = set(generate_kwargs.get("eos_token_id") or _eos_ids(model))
    new_tokens = []
    for row in sequences[:, prompt_length:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        new_tokens.append(row[:cut])
    return GenerationResult(sequences, new_tokens, kept, cache, output)


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
