"""Tiny Llama / Mistral / Qwen2 models built from configs, for the CPU tests."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
VOCAB = 256


def tiny_model(family: str = "llama", attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0):
    config_class, model_class = FAMILIES[family]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                          rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mistral":
        config.sliding_window = None
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # sharper attention than the random init gives, so selection actually matters
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def random_prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def batch_with_padding():
    """Three 90-token prompts, the second and third left-padded by 17 and 52 tokens."""
    prompt = random_prompt(90, batch=3, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :17] = 0
    mask[2, :52] = 0
    return prompt, mask


def long_and_short(long: int = 70, short: int = 45):
    """(batch, mask, long prompt, short prompt): two prompts (seeds 3 and 4) in one batch, the short one
    left-padded to the long one's length."""
    long_prompt, short_prompt = random_prompt(long, seed=3), random_prompt(short, seed=4)
    batch = torch.zeros(2, long, dtype=torch.long)
    mask = torch.zeros(2, long, dtype=torch.long)
    batch[0], mask[0] = long_prompt[0], 1
    batch[1, long - short:], mask[1, long - short:] = short_prompt[0], 1
    return batch, mask, long_prompt, short_prompt


@contextmanager
def one_thread():
    """Run the block on one CPU thread: the tiny models' tensors are so small that more threads only add
    overhead (10× on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_chat_llama(folder, tokenizer, max_positions: int = 1024):
    """A two-layer Llama sized to `tokenizer`, saved with it in `folder` (the runners' tests load it by path)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_script(relative_path: str):
    """A top-level script of the repository (run_longbench.py, ...) as a module, its main() callable."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(f"ntkkv_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_head_scores(path, layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 2) -> str:
    """A head-scores file (compute_head_scores.py's format) for the tiny models, skewed so heads differ."""
    import json

    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(layers, heads, generator=generator) ** 3).tolist()
    Path(path).write_text(json.dumps({"format": "ntkkv-head-scores/1", "model": "tiny", "score": "retrieval",
                                      "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads,
                                      "scores": scores}))
    return str(path)


def method_options(method: str, folder) -> dict:
    """What a method needs beyond its budget on the tiny models: HeadKV its head-scores file."""
    return {"head_scores": tiny_head_scores(Path(folder) / "head_scores.json")} if method == "headkv" else {}
